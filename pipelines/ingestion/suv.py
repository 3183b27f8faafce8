"""PET body-weight SUV (SUVbw) scaling factors, following the QIBA vendor-neutral SUV pseudo-code.

Convention: :func:`suvbw_factors` returns one factor per instance (or frame) such that::

    SUVbw [g/mL] = (stored value * RescaleSlope + RescaleIntercept) * factor

that is, the factor multiplies the values *after* Rescale Slope/Intercept (which must still be applied per
instance, since scanners may change them from slice to slice). For Units ``BQML`` the rescaled values are
activity concentrations in Bq/mL and the factor is ``weight [g] / decay-corrected injected dose [Bq]``. For
Philips ``CNTS`` images the vendor's scale factor is folded in (the SUV scale factor (7053,1000) directly, or
the activity concentration scale factor (7053,1009) times the Bq/mL factor). For ``GML`` the rescaled values are
already SUVbw and the factor is 1.

Scan time (the time the injected dose is decayed to), per QIBA:

* the earliest Series date/time, when no instance was acquired before it;
* otherwise (the series may have been post-processed, its date/time then says when it was made) the GE private
  post-injection scan date/time (0009,100D) "GEMS_PETD_01" when present;
* otherwise, per frame, the Siemens multi-injection back-computation from Acquisition date/time, Frame Reference
  Time and Actual Frame Duration when every instance has positive values for both;
* otherwise the earliest Acquisition date/time.

The injection time is Radiopharmaceutical Start DateTime, or Radiopharmaceutical Start Time on the Series date
(on the day before when that alone would put the injection after the scan, i.e. the scan spans midnight).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Sequence
from datetime import date, datetime, time, timedelta
from typing import Any

from pydicom.dataset import Dataset
from pydicom.tag import Tag

from pipelines.errors import InputError

log = logging.getLogger(__name__)

SUPPORTED_UNITS = ("BQML", "CNTS", "GML")
PHILIPS_PET_CREATOR = "Philips PET Private Group"
GE_PET_CREATOR = "GEMS_PETD_01"
_PHILIPS_GROUP, _PHILIPS_SUV_OFFSET, _PHILIPS_ACTIVITY_OFFSET = 0x7053, 0x00, 0x09
_GE_GROUP, _GE_SCAN_DATETIME_OFFSET = 0x0009, 0x0D
# An injection time known only as a time of day is put on the day before the series when that gives a decay
# time under this bound; anything else is reported as inconsistent rather than guessed.
_MAX_MIDNIGHT_ROLLBACK = timedelta(hours=12)

# SuvInputs field -> the DICOM keyword (or private tag) it comes from, for error messages.
_KEYWORDS = {
    "units": "Units",
    "corrected_image": "CorrectedImage",
    "decay_correction": "DecayCorrection",
    "series_datetime": "SeriesDate/SeriesTime",
    "acquisition_datetime": "AcquisitionDate/AcquisitionTime",
    "radionuclide_total_dose_bq": "RadionuclideTotalDose",
    "radionuclide_half_life_s": "RadionuclideHalfLife",
    "injection_datetime": "RadiopharmaceuticalStartDateTime/RadiopharmaceuticalStartTime",
    "patient_weight_kg": "PatientWeight",
    "philips_suv_scale_factor": "Philips SUV scale factor (7053,1000)",
    "philips_activity_concentration_scale_factor": "Philips activity concentration scale factor (7053,1009)",
    "ge_post_injection_datetime": "GE post-injection scan date/time (0009,100D)",
    "frame_reference_time_ms": "FrameReferenceTime",
    "actual_frame_duration_ms": "ActualFrameDuration",
}

_TM = re.compile(r"^(\d{2})(?::?(\d{2})(?::?(\d{2})(?:\.(\d+))?)?)?$")
_DA = re.compile(r"^(\d{4})\.?(\d{2})\.?(\d{2})$")
_DT = re.compile(r"^(\d{4})(\d{2})(\d{2})(\d{2})(\d{2})?(\d{2})?(?:\.(\d+))?(?:[+-]\d{4})?$")


@dataclasses.dataclass(frozen=True)
class SuvInputs:
    """What the SUVbw factor of one PET instance (or frame) depends on; ``None`` where the header has no value.

    ``injection_datetime`` is set from Radiopharmaceutical Start DateTime; when only the Start Time is known
    ``injection_time`` holds it and the date is taken from the series.
    """

    units: str
    corrected_image: tuple[str, ...] = ()
    decay_correction: str | None = None
    series_datetime: datetime | None = None
    acquisition_datetime: datetime | None = None
    radionuclide_total_dose_bq: float | None = None
    radionuclide_half_life_s: float | None = None
    injection_datetime: datetime | None = None
    injection_time: time | None = None
    patient_weight_kg: float | None = None
    philips_suv_scale_factor: float | None = None
    philips_activity_concentration_scale_factor: float | None = None
    ge_post_injection_datetime: datetime | None = None
    frame_reference_time_ms: float | None = None
    actual_frame_duration_ms: float | None = None


# --------------------------------------------------------------------------------------------------- extraction


def suv_inputs_from_dataset(ds: Dataset) -> SuvInputs:
    """The SUV inputs of one PET instance read from its header (pixel data is not needed).

    Raises :class:`InputError` (``PET_SUV_MISSING_TAG``, ``PET_SUV_UNSUPPORTED_UNITS``, ``PET_SUV_BAD_VALUE``,
    ``PET_SUV_NOT_CORRECTED``) when the instance cannot give an SUVbw factor.
    """
    units = _text(_get(ds, "Units"))
    if not units:
        raise InputError("PET_SUV_MISSING_TAG", "the PET instance has no Units (0054,1001); SUV needs it")
    rp = _radiopharmaceutical_item(ds)
    series_date = _parse_date(_get(ds, "SeriesDate"), "SeriesDate")
    inputs = SuvInputs(
        units=units.upper(),
        corrected_image=tuple(v.upper() for v in _texts(_get(ds, "CorrectedImage"))),
        decay_correction=(_text(_get(ds, "DecayCorrection")) or "").upper() or None,
        series_datetime=_combine(series_date, _parse_time(_get(ds, "SeriesTime"), "SeriesTime")),
        acquisition_datetime=_acquisition_datetime(ds, series_date),
        radionuclide_total_dose_bq=_number(_get(rp, "RadionuclideTotalDose"), "RadionuclideTotalDose"),
        radionuclide_half_life_s=_number(_get(rp, "RadionuclideHalfLife"), "RadionuclideHalfLife"),
        injection_datetime=_parse_datetime(_get(rp, "RadiopharmaceuticalStartDateTime"),
                                           "RadiopharmaceuticalStartDateTime"),
        injection_time=_parse_time(_get(rp, "RadiopharmaceuticalStartTime"), "RadiopharmaceuticalStartTime"),
        patient_weight_kg=_number(_get(ds, "PatientWeight"), "PatientWeight"),
        philips_suv_scale_factor=_number(
            _private_value(ds, _PHILIPS_GROUP, PHILIPS_PET_CREATOR, _PHILIPS_SUV_OFFSET),
            _KEYWORDS["philips_suv_scale_factor"],
        ),
        philips_activity_concentration_scale_factor=_number(
            _private_value(ds, _PHILIPS_GROUP, PHILIPS_PET_CREATOR, _PHILIPS_ACTIVITY_OFFSET),
            _KEYWORDS["philips_activity_concentration_scale_factor"],
        ),
        ge_post_injection_datetime=_parse_datetime(
            _private_value(ds, _GE_GROUP, GE_PET_CREATOR, _GE_SCAN_DATETIME_OFFSET),
            _KEYWORDS["ge_post_injection_datetime"],
        ),
        frame_reference_time_ms=_number(_get(ds, "FrameReferenceTime"), "FrameReferenceTime"),
        actual_frame_duration_ms=_number(_get(ds, "ActualFrameDuration"), "ActualFrameDuration"),
    )
    _check_instance(inputs)
    return inputs


def _radiopharmaceutical_item(ds: Dataset) -> Dataset:
    sequence = _get(ds, "RadiopharmaceuticalInformationSequence")
    if not sequence:
        return Dataset()
    if len(sequence) > 1:
        log.warning("RadiopharmaceuticalInformationSequence has %d items; the first one is used", len(sequence))
    item: Dataset = sequence[0]
    return item


def _acquisition_datetime(ds: Dataset, series_date: date | None) -> datetime | None:
    acquisition_time = _parse_time(_get(ds, "AcquisitionTime"), "AcquisitionTime")
    if acquisition_time is None:
        return _parse_datetime(_get(ds, "AcquisitionDateTime"), "AcquisitionDateTime")
    acquisition_date = _parse_date(_get(ds, "AcquisitionDate"), "AcquisitionDate") or series_date
    return _combine(acquisition_date, acquisition_time)


def _get(ds: Dataset, keyword: str) -> Any:
    """An element's value by keyword; pydicom converts on access, so a malformed value fails here."""
    try:
        return ds.get(keyword)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InputError("PET_SUV_BAD_VALUE", f"{keyword} cannot be read ({type(exc).__name__})") from None


def _private_value(ds: Dataset, group: int, creator: str, offset: int) -> Any:
    """The value of a private element by its creator and offset in the block, or None."""
    for element in range(0x10, 0x100):
        creator_element = ds.get(Tag(group, element))
        if creator_element is not None and _text(creator_element.value) == creator:
            try:
                data_element = ds.get(Tag(group, (element << 8) | offset))
                return None if data_element is None else data_element.value
            except (ValueError, TypeError, OverflowError):
                raise InputError("PET_SUV_BAD_VALUE", f"private {creator} element cannot be read") from None
    return None


# --------------------------------------------------------------------------------------------------- factors


def suvbw_factors(instances: Sequence[SuvInputs]) -> list[float]:
    """One SUVbw factor per instance of one PET series (see the module docstring for what it multiplies).

    Raises :class:`InputError` with a ``PET_SUV_*`` code for missing, inconsistent or unusable inputs.
    """
    if not instances:
        raise InputError("PET_SUV_NO_INSTANCES", "no PET instances were given; SUV needs at least one")
    for inputs in instances:
        _check_instance(inputs)
    _check_one_series(instances)
    units = instances[0].units
    if units == "GML":
        return [1.0] * len(instances)
    if units == "CNTS":
        return _cnts_factors(instances)
    return _bqml_factors(instances)


def _cnts_factors(instances: Sequence[SuvInputs]) -> list[float]:
    suv_scale = [i.philips_suv_scale_factor for i in instances]
    if all(suv_scale):
        return [float(f or 0.0) for f in suv_scale]
    activity_scale = [i.philips_activity_concentration_scale_factor for i in instances]
    if all(activity_scale):
        # (7053,1009) x rescaled counts gives Bq/mL; from there on it is the BQML case.
        return [float(a or 0.0) * f for a, f in zip(activity_scale, _bqml_factors(instances), strict=True)]
    raise InputError(
        "PET_SUV_MISSING_TAG",
        "Units are CNTS but not every instance has a non-zero Philips SUV scale factor (7053,1000) or activity "
        "concentration scale factor (7053,1009); SUV cannot be computed from counts without them",
    )


def _bqml_factors(instances: Sequence[SuvInputs]) -> list[float]:
    first = instances[0]
    weight_g = float(_require(first, "patient_weight_kg")) * 1000.0
    dose_bq = float(_require(first, "radionuclide_total_dose_bq"))
    half_life_s = float(_require(first, "radionuclide_half_life_s"))
    decay_correction = _require(first, "decay_correction")
    if decay_correction == "ADMIN":
        # Activities are already decay corrected to the administration time.
        return [weight_g / dose_bq] * len(instances)
    if decay_correction != "START":
        raise InputError(
            "PET_SUV_UNSUPPORTED_DECAY_CORRECTION",
            f"DecayCorrection is {decay_correction!r}; SUV needs images decay corrected to START or ADMIN",
        )
    scan_times = scan_datetimes(instances)
    injection = _injection_datetime(first, min(scan_times))
    factors = []
    for scan_time in scan_times:
        decay_s = (scan_time - injection).total_seconds()
        if decay_s < 0:
            raise InputError(
                "PET_SUV_TIMES_INCONSISTENT",
                f"the injection time is {-decay_s:.0f} s after the scan time; check the Radiopharmaceutical "
                "Start (Date)Time and the Series/Acquisition times",
            )
        factors.append(weight_g / (dose_bq * 2.0 ** (-decay_s / half_life_s)))
    return factors


def scan_datetimes(instances: Sequence[SuvInputs]) -> list[datetime]:
    """The date/time each instance's activity is decay corrected to (QIBA 'scan Date Time')."""
    series = min(_require(i, "series_datetime") for i in instances)
    acquisitions: list[datetime] = [_require(i, "acquisition_datetime") for i in instances]
    if series <= min(acquisitions):
        return [series] * len(instances)
    ge_time = instances[0].ge_post_injection_datetime
    if ge_time is not None:
        log.info("acquisition precedes the series time; using the GE private post-injection scan time")
        return [ge_time] * len(instances)
    if all(_has_frame_times(i) for i in instances):
        log.info("acquisition precedes the series time; back-computing the scan time per frame")
        return [_frame_scan_datetime(i) for i in instances]
    log.warning("acquisition precedes the series time and frame times are missing; using the earliest acquisition")
    return [min(acquisitions)] * len(instances)


def _has_frame_times(inputs: SuvInputs) -> bool:
    return bool(inputs.frame_reference_time_ms and inputs.frame_reference_time_ms > 0
                and inputs.actual_frame_duration_ms and inputs.actual_frame_duration_ms > 0)


def _frame_scan_datetime(inputs: SuvInputs) -> datetime:
    """Siemens multi-injection logic: Acquisition date/time is the frame start, Frame Reference Time (ms) the
    offset from the wanted scan time to the frame's average count rate time."""
    decay_constant = math.log(2.0) / float(_require(inputs, "radionuclide_half_life_s"))
    decay_during_frame = decay_constant * float(_require(inputs, "actual_frame_duration_ms")) / 1000.0
    average_count_rate_s = math.log(decay_during_frame / -math.expm1(-decay_during_frame)) / decay_constant
    offset_s = average_count_rate_s - float(_require(inputs, "frame_reference_time_ms")) / 1000.0
    acquisition: datetime = _require(inputs, "acquisition_datetime")
    return acquisition + timedelta(seconds=offset_s)


def _injection_datetime(inputs: SuvInputs, earliest_scan: datetime) -> datetime:
    if inputs.injection_datetime is not None:
        return inputs.injection_datetime
    if inputs.injection_time is None:
        raise InputError("PET_SUV_MISSING_TAG", f"the PET instance has no {_KEYWORDS['injection_datetime']}")
    series: datetime = _require(inputs, "series_datetime")
    injection = datetime.combine(series.date(), inputs.injection_time)
    if injection > earliest_scan and injection - timedelta(days=1) >= earliest_scan - _MAX_MIDNIGHT_ROLLBACK:
        log.warning("the injection time of day is after the scan; assuming the injection was the day before")
        return injection - timedelta(days=1)
    return injection


# --------------------------------------------------------------------------------------------------- checks


def _check_instance(inputs: SuvInputs) -> None:
    """What one instance must have whatever the rest of the series says."""
    if inputs.units not in SUPPORTED_UNITS:
        raise InputError(
            "PET_SUV_UNSUPPORTED_UNITS",
            f"Units are {inputs.units!r}; SUVbw can be computed from {', '.join(SUPPORTED_UNITS)} only",
        )
    if not inputs.corrected_image:
        raise InputError("PET_SUV_MISSING_TAG", "the PET instance has no CorrectedImage (0028,0051); SUV needs it")
    missing = [flag for flag in ("ATTN", "DECY") if flag not in inputs.corrected_image]
    if missing:
        raise InputError(
            "PET_SUV_NOT_CORRECTED",
            f"CorrectedImage lacks {' and '.join(missing)}; SUV needs attenuation and decay corrected images",
        )
    for field in ("patient_weight_kg", "radionuclide_total_dose_bq", "radionuclide_half_life_s"):
        value = getattr(inputs, field)
        if value is not None and value <= 0:
            raise InputError("PET_SUV_BAD_VALUE", f"{_KEYWORDS[field]} is {value}; it must be positive")
    if inputs.units == "BQML" or (inputs.units == "CNTS" and not inputs.philips_suv_scale_factor):
        for field in ("patient_weight_kg", "radionuclide_total_dose_bq", "radionuclide_half_life_s",
                      "decay_correction", "series_datetime", "acquisition_datetime"):
            _require(inputs, field)
        if inputs.injection_datetime is None and inputs.injection_time is None:
            _require(inputs, "injection_datetime")


def _check_one_series(instances: Sequence[SuvInputs]) -> None:
    """Series-level values must agree between instances (Series date/time may differ: the earliest is used)."""
    first = instances[0]
    fields = ("units", "decay_correction", "radionuclide_total_dose_bq", "radionuclide_half_life_s",
              "injection_datetime", "injection_time", "patient_weight_kg", "ge_post_injection_datetime")
    for inputs in instances[1:]:
        differing = [f for f in fields if getattr(inputs, f) != getattr(first, f)]
        if set(inputs.corrected_image) != set(first.corrected_image):
            differing.append("corrected_image")
        if differing:
            names = ", ".join(_KEYWORDS.get(f, f) for f in differing)
            raise InputError(
                "PET_SUV_SERIES_INCONSISTENT",
                f"the instances disagree on {names}; pass the instances of one PET series only",
            )


def _require(inputs: SuvInputs, field: str) -> Any:
    """The field's value; ``PET_SUV_MISSING_TAG`` naming the DICOM keyword when it is absent."""
    value = getattr(inputs, field)
    if value is None:
        raise InputError("PET_SUV_MISSING_TAG", f"the PET instance has no {_KEYWORDS.get(field, field)}; SUV needs it")
    return value


# --------------------------------------------------------------------------------------------------- parsing


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    text = str(value).strip(" \x00")
    return text or None


def _texts(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, bytes)):
        text = _text(value) or ""
        return [part.strip() for part in text.split("\\") if part.strip()]
    return [t for t in (_text(v) for v in value) if t]


def _number(value: Any, keyword: str) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        text = _text(value)
        if text is None:
            return None
        try:
            number = float(text)
        except ValueError:
            raise InputError("PET_SUV_BAD_VALUE", f"{keyword} is {text[:40]!r}, not a number") from None
    if not math.isfinite(number):
        raise InputError("PET_SUV_BAD_VALUE", f"{keyword} is {number}; it must be finite")
    return number


def _combine(day: date | None, clock: time | None) -> datetime | None:
    return None if day is None or clock is None else datetime.combine(day, clock)


def _parse_date(value: Any, keyword: str) -> date | None:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    text = _text(value)
    if text is None:
        return None
    match = _DA.match(text)
    try:
        if match is None:
            raise ValueError(text)
        return date(int(match[1]), int(match[2]), int(match[3]))
    except ValueError:
        raise InputError("PET_SUV_BAD_VALUE", f"{keyword} {text[:30]!r} is not a DICOM date (YYYYMMDD)") from None


def _parse_time(value: Any, keyword: str) -> time | None:
    if isinstance(value, time):
        return value.replace(tzinfo=None)
    text = _text(value)
    if text is None:
        return None
    match = _TM.match(text)
    try:
        if match is None:
            raise ValueError(text)
        return time(int(match[1]), int(match[2] or 0), int(match[3] or 0), _microseconds(match[4]))
    except ValueError:
        raise InputError("PET_SUV_BAD_VALUE", f"{keyword} {text[:30]!r} is not a DICOM time (HHMMSS.FFFFFF)") from None


def _parse_datetime(value: Any, keyword: str) -> datetime | None:
    """A DICOM DT down to at least the hour; a UTC offset is dropped (all times are taken as local)."""
    if isinstance(value, datetime):
        return value.replace(tzinfo=None)
    text = _text(value)
    if text is None:
        return None
    match = _DT.match(text)
    try:
        if match is None:
            raise ValueError(text)
        year, month, day, hour, minute, second = (int(match[k] or 0) for k in range(1, 7))
        return datetime(year, month, day, hour, minute, second, _microseconds(match[7]))
    except ValueError:
        raise InputError(
            "PET_SUV_BAD_VALUE", f"{keyword} {text[:30]!r} is not a DICOM date-time (YYYYMMDDHHMMSS.FFFFFF)"
        ) from None


def _microseconds(fraction: str | None) -> int:
    return int((fraction or "0")[:6].ljust(6, "0"))
