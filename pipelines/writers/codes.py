"""Coded concepts for segments: the manifest's codes first, then well-known structures by name."""

from __future__ import annotations

from pydicom.sr.coding import Code

ANATOMICAL_STRUCTURE = Code("123037004", "SCT", "Anatomical Structure")
TISSUE = Code("85756007", "SCT", "Tissue")
MORPHOLOGICALLY_ABNORMAL = Code("49755003", "SCT", "Morphologically Altered Structure")

# SNOMED CT codes for structures by common label names (lower case, '_' or ' ' separated).
KNOWN_STRUCTURES: dict[str, Code] = {
    "liver": Code("10200004", "SCT", "Liver"),
    "spleen": Code("78961009", "SCT", "Spleen"),
    "kidney": Code("64033007", "SCT", "Kidney"),
    "kidney_left": Code("64033007", "SCT", "Kidney"),
    "kidney_right": Code("64033007", "SCT", "Kidney"),
    "spine": Code("421060004", "SCT", "Spinal column"),
    "gallbladder": Code("28231008", "SCT", "Gallbladder"),
    "esophagus": Code("32849002", "SCT", "Esophagus"),
    "stomach": Code("69695003", "SCT", "Stomach"),
    "aorta": Code("15825003", "SCT", "Aorta"),
    "inferior_vena_cava": Code("64131007", "SCT", "Inferior vena cava"),
    "pancreas": Code("15776009", "SCT", "Pancreas"),
    "adrenal_gland_left": Code("23451007", "SCT", "Adrenal gland"),
    "adrenal_gland_right": Code("23451007", "SCT", "Adrenal gland"),
    "lung": Code("39607008", "SCT", "Lung"),
    "heart": Code("80891009", "SCT", "Heart"),
    "brain": Code("12738006", "SCT", "Brain"),
    "prostate": Code("41216001", "SCT", "Prostate"),
    "bladder": Code("89837001", "SCT", "Urinary bladder"),
    "tumor": Code("108369006", "SCT", "Neoplasm"),
    "tumour": Code("108369006", "SCT", "Neoplasm"),
    "lesion": Code("52988006", "SCT", "Lesion"),
}
LATERALITY = {"left": Code("7771000", "SCT", "Left"), "right": Code("24028007", "SCT", "Right")}
_ABNORMAL = {"tumor", "tumour", "lesion"}


def segment_codes(name: str, code: dict[str, str] | None) -> tuple[Code, Code]:
    """(category, type) for a segment: the manifest's code, a known structure, or generic Tissue."""
    key = name.lower().replace(" ", "_")
    if code:
        kind = Code(code["value"], code["scheme"], code["meaning"])
        category = MORPHOLOGICALLY_ABNORMAL if key in _ABNORMAL else ANATOMICAL_STRUCTURE
        return category, kind
    if key in KNOWN_STRUCTURES:
        return (MORPHOLOGICALLY_ABNORMAL if key in _ABNORMAL else ANATOMICAL_STRUCTURE), KNOWN_STRUCTURES[key]
    return TISSUE, TISSUE
