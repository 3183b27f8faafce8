"""Model registry (readable without torch), network factories and the segmenter families."""
