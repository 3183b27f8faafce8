"""PET SUVbw factors against the cornerstonejs/calculate-suv sample headers and two real PET slices.

The sample headers (``test/metadata/<name>-instances.json``: one JSON object per instance, DICOM-keyword keys)
are turned into pydicom datasets, written to and read back from implicit-VR little-endian bytes (as the
calculate-suv samples were converted), so :func:`suv_inputs_from_dataset` is exercised on what a reader sees.
"""

from __future__ import annotations

import csv
import io
import json
import math
from datetime import datetime
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ImplicitVRLittleEndian, PositronEmissionTomographyImageStorage, generate_uid

from pipelines.errors import InputError
from pipelines.ingestion.suv import (
    GE_PET_CREATOR,
    PHILIPS_PET_CREATOR,
    SuvInputs,
    suv_inputs_from_dataset,
    suvbw_factors,
)

pytestmark = pytest.mark.shared_data

SUV_DATA = "cornerstone_calculate_suv"
TOLERANCE = 1e-6  # as in calculate-suv's calculateSUV_SampleData.test.ts
RADIOPHARMACEUTICAL_KEYS = (
    "RadionuclideTotalDose",
    "RadionuclideHalfLife",
    "RadiopharmaceuticalStartTime",
    "RadiopharmaceuticalStartDateTime",
)
# calculate-suv's own names for private values -> (group, private creator, element offset, VR)
PRIVATE_KEYS = {
    "SUVScaleFactor": (0x7053, PHILIPS_PET_CREATOR, 0x00, "DS"),
    "ActivityConcentrationScaleFactor": (0x7053, PHILIPS_PET_CREATOR, 0x09, "DS"),
    "GEPrivatePostInjectionDateTime": (0x0009, GE_PET_CREATOR, 0x0D, "DT"),
}


def _expected_factors() -> list[Any]:
    from tests.conftest import shared_data_dir

    root = shared_data_dir()
    table = root / SUV_DATA / "EXPECTED_SUVBW_FACTORS.tsv" if root else None
    if table is None or not table.is_file():
        # Still one parametrised case, so the shared_data fixture reports the skip reason.
        return [pytest.param("absent", math.nan, id="EXPECTED_SUVBW_FACTORS.tsv-absent")]
    lines = [line for line in table.read_text().splitlines() if line and not line.startswith("#")]
    rows = csv.DictReader(lines, delimiter="\t")
    return [pytest.param(row["name"], float(row["expected_suvbw_factor"]), id=row["name"]) for row in rows]


def _dataset_from_json(instance: dict[str, Any]) -> Dataset:
    """A PET header from one calculate-suv JSON instance, round-tripped through implicit-VR bytes."""
    ds = Dataset()
    item = Dataset()
    for key, value in instance.items():
        if key in RADIOPHARMACEUTICAL_KEYS:
            setattr(item, key, _dicom_value(value))
        elif key in ("PhilipsPETPrivateGroup", "GEPrivatePostInjectionDateTime"):
            private = value if isinstance(value, dict) else {key: value}
            for name, private_value in private.items():
                group, creator, offset, vr = PRIVATE_KEYS[name]
                ds.private_block(group, creator, create=True).add_new(offset, vr, _dicom_value(private_value))
        else:
            setattr(ds, key, _dicom_value(value))
    ds.RadiopharmaceuticalInformationSequence = [item]
    ds.Modality = "PT"
    ds.SOPClassUID = PositronEmissionTomographyImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def _dicom_value(value: Any) -> Any:
    """JSON numbers as the decimal strings a DICOM file holds (DS/IS); strings and lists unchanged."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    return str(value)


def _load_instances(shared_data: Path, name: str) -> list[dict[str, Any]]:
    path = shared_data / SUV_DATA / "test" / "metadata" / f"{name}-instances.json"
    if not path.is_file():
        pytest.skip(f"{path.name} is absent from the shared data")
    instances: list[dict[str, Any]] = json.loads(path.read_text())
    return instances


@pytest.mark.parametrize(("name", "expected"), _expected_factors())
def test_suvbw_factors_match_calculate_suv(shared_data: Path, name: str, expected: float) -> None:
    instances = _load_instances(shared_data, name)
    inputs = [suv_inputs_from_dataset(_dataset_from_json(instance)) for instance in instances]
    factors = suvbw_factors(inputs)
    assert len(factors) == len(instances)
    # calculate-suv asserts the first factor; each sample series has one factor for all its instances,
    # so every instance is held to the same expected value.
    for index, factor in enumerate(factors):
        assert abs(factor - expected) < TOLERANCE, f"{name} instance {index}: {factor} != {expected}"
        assert math.isclose(factor, expected, rel_tol=1e-9), f"{name} instance {index}: {factor} != {expected}"


def test_extraction_reads_private_and_sequence_values(shared_data: Path) -> None:
    instance = _load_instances(shared_data, "PHILIPS_CNTS_AND_BQML_SUV")[0]
    inputs = suv_inputs_from_dataset(_dataset_from_json(instance))
    assert inputs.units == "CNTS"
    assert inputs.philips_suv_scale_factor == pytest.approx(0.000551)
    assert inputs.philips_activity_concentration_scale_factor == pytest.approx(1.602563)
    assert inputs.radionuclide_total_dose_bq == pytest.approx(238000000)
    assert inputs.radionuclide_half_life_s == pytest.approx(6588)
    assert inputs.injection_datetime is None and inputs.injection_time is not None
    assert inputs.series_datetime == datetime(2020, 12, 17, 9, 35, 56)


def test_activity_concentration_scale_factor_path(shared_data: Path) -> None:
    """Philips CNTS without (7053,1000): (7053,1009) times the Bq/mL factor."""
    instance = dict(_load_instances(shared_data, "PHILIPS_CNTS_AND_BQML_SUV")[0])
    instance["PhilipsPETPrivateGroup"] = {"ActivityConcentrationScaleFactor": "1.602563"}
    cnts = suvbw_factors([suv_inputs_from_dataset(_dataset_from_json(instance))])[0]
    instance["Units"] = "BQML"
    bqml = suvbw_factors([suv_inputs_from_dataset(_dataset_from_json(instance))])[0]
    assert cnts == pytest.approx(1.602563 * bqml, rel=1e-12)


def test_missing_weight_is_a_coded_error(shared_data: Path) -> None:
    instance = dict(_load_instances(shared_data, "SIEMENS")[0])
    del instance["PatientWeight"]
    with pytest.raises(InputError) as caught:
        suvbw_factors([suv_inputs_from_dataset(_dataset_from_json(instance))])
    assert caught.value.code == "PET_SUV_MISSING_TAG"
    assert "PatientWeight" in caught.value.message


def test_zero_weight_is_a_coded_error(shared_data: Path) -> None:
    instance = dict(_load_instances(shared_data, "SIEMENS")[0], PatientWeight=0)
    with pytest.raises(InputError) as caught:
        suv_inputs_from_dataset(_dataset_from_json(instance))
    assert caught.value.code == "PET_SUV_BAD_VALUE"
    assert "PatientWeight" in caught.value.message


def test_unsupported_units_is_a_coded_error(shared_data: Path) -> None:
    instance = dict(_load_instances(shared_data, "SIEMENS")[0])
    instance["Units"] = "PROP"
    with pytest.raises(InputError) as caught:
        suv_inputs_from_dataset(_dataset_from_json(instance))
    assert caught.value.code == "PET_SUV_UNSUPPORTED_UNITS"


def test_injection_after_scan_is_a_coded_error(shared_data: Path) -> None:
    instance = dict(_load_instances(shared_data, "GE_MEDICAL_AND_BQML")[0])
    instance["RadiopharmaceuticalStartDateTime"] = "20201217100000"
    with pytest.raises(InputError) as caught:
        suvbw_factors([suv_inputs_from_dataset(_dataset_from_json(instance))])
    assert caught.value.code == "PET_SUV_TIMES_INCONSISTENT"


def test_mixed_series_is_a_coded_error(shared_data: Path) -> None:
    first, second = _load_instances(shared_data, "SIEMENS")[:2]
    second = dict(second, PatientWeight=second["PatientWeight"] + 10)
    inputs = [suv_inputs_from_dataset(_dataset_from_json(instance)) for instance in (first, second)]
    with pytest.raises(InputError) as caught:
        suvbw_factors(inputs)
    assert caught.value.code == "PET_SUV_SERIES_INCONSISTENT"


def test_uncorrected_image_is_a_coded_error() -> None:
    inputs = SuvInputs(units="GML", corrected_image=("ATTN",))
    with pytest.raises(InputError) as caught:
        suvbw_factors([inputs])
    assert caught.value.code == "PET_SUV_NOT_CORRECTED"


def test_gml_is_already_suv() -> None:
    assert suvbw_factors([SuvInputs(units="GML", corrected_image=("ATTN", "DECY"))] * 2) == [1.0, 1.0]


def test_injection_before_midnight_with_start_time_only() -> None:
    """Only a Start Time later in the day than the scan: the injection was the day before (QIBA 'spanning
    midnight'), here 30 min before a 00:30 scan."""
    inputs = SuvInputs(
        units="BQML", corrected_image=("ATTN", "DECY"), decay_correction="START",
        series_datetime=datetime(2021, 1, 2, 0, 30), acquisition_datetime=datetime(2021, 1, 2, 0, 30),
        radionuclide_total_dose_bq=3.0e8, radionuclide_half_life_s=6586.2,
        injection_time=datetime(2021, 1, 1, 23, 30).time(), patient_weight_kg=70.0,
    )
    expected = 70_000.0 / (3.0e8 * 2.0 ** (-3600.0 / 6586.2))
    assert suvbw_factors([inputs]) == [pytest.approx(expected, rel=1e-12)]


@pytest.mark.parametrize("name", ["1.dcm", "2.dcm"])
def test_real_pet_slice(shared_data: Path, name: str) -> None:
    path = shared_data / "suyashkumar_dicom" / "testdata" / name
    if not path.is_file():
        pytest.skip(f"suyashkumar_dicom/testdata/{name} is absent from the shared data")
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    inputs = suv_inputs_from_dataset(ds)
    assert inputs.units == "BQML"
    (factor,) = suvbw_factors([inputs])
    assert math.isfinite(factor) and factor > 0
    # These slices are BQML with Series time <= Acquisition time: SUVbw factor = weight [g] / dose decayed
    # from the injection (Radiopharmaceutical Start Time on the Series date) to the Series time.
    rp = ds.RadiopharmaceuticalInformationSequence[0]
    assert inputs.series_datetime is not None and inputs.injection_time is not None
    injection = datetime.combine(inputs.series_datetime.date(), inputs.injection_time)
    decay_s = (inputs.series_datetime - injection).total_seconds()
    decayed_dose = float(rp.RadionuclideTotalDose) * 2 ** (-decay_s / float(rp.RadionuclideHalfLife))
    expected = float(ds.PatientWeight) * 1000 / decayed_dose
    assert factor == pytest.approx(expected, rel=1e-12)
    # A plausible SUV scale: a 50-120 kg patient and 100-500 MBq give about 1e-4 to 1e-3 g/Bq.
    assert 1e-5 < factor < 1e-2
