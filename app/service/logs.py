"""Service logging: one line per event with time, process and logger; job ids, never patient data."""

from __future__ import annotations

import logging
import warnings

NOISY = ("monai", "nibabel", "PIL", "matplotlib", "highdicom", "pydicom", "python_multipart", "multipart",
         "dicomweb_client")


def configure_service_logging(process: str, verbose: bool = False) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [{process}] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.WARNING)
    if not verbose:
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
