"""Bounded fuzzing: schemathesis against the running service (no 5xx, every answer matches the OpenAPI schema),
and hypothesis against the DICOM reader (tag deletions and value changes on a valid series raise nothing but the
reader's own errors)."""

from __future__ import annotations

import io

import pydicom
import pytest
import schemathesis
from schemathesis.checks import positive_data_acceptance
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dicom_factory import series_from_image, to_bytes
from server.imaging.dicom_reader import load_series
from server.core.errors import InputError
from test_api import phantom
from common import Serve

FUZZ_EXAMPLES = 30
FUZZ_KEY = "fuzz-key"


@pytest.fixture(scope="module")
def api_schema(intensity_bundle, tmp_path_factory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("fuzz")
    server = Serve(intensity_bundle, root / "storage", root / "ctseg.log", CTSEG_MAX_QUEUE="1000",
                   CTSEG_API_KEYS=FUZZ_KEY).start()
    try:
        yield schemathesis.openapi.from_url(server.url + "/openapi.json", headers={"X-API-Key": FUZZ_KEY})
    finally:
        server.kill()


def test_the_api_never_answers_5xx_and_matches_its_schema(api_schema):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 8
    calls = 0
    for operation in operations:
        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(operation.as_strategy())
        def check(case):  # type: ignore[no-untyped-def]
            nonlocal calls
            response = case.call(timeout=120, headers={"X-API-Key": FUZZ_KEY})
            calls += 1
            # No 5xx, documented status codes and content types, bodies that match their response models, auth that
            # is enforced. Not "positive data acceptance": a schema-valid upload of random bytes is rightly a 422.
            case.validate_response(response, excluded_checks=[positive_data_acceptance],
                                   headers={"X-API-Key": FUZZ_KEY})

        check()
    print(f"schemathesis: {calls} calls over {len(operations)} operations")


# ------------------------------------------------------------------------------------------------- DICOM reader
BASE = [to_bytes(ds) for ds in series_from_image(phantom(shape=(24, 20, 12))[0])]
KEYWORDS = ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns", "BitsAllocated",
            "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation",
            "RescaleSlope", "RescaleIntercept", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality",
            "PixelData", "NumberOfFrames", "PixelPaddingValue", "StudyInstanceUID", "FrameOfReferenceUID"]
VALUES = st.one_of(st.integers(-2**31, 2**31), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
                   st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=7), st.just(""), st.none())


@st.composite
def mutations(draw):  # type: ignore[no-untyped-def]
    return draw(st.lists(st.tuples(st.integers(0, len(BASE) - 1), st.sampled_from(KEYWORDS),
                                   st.sampled_from(["delete", "set"]), VALUES), min_size=1, max_size=4))


def mutate(changes) -> list[tuple[str, bytes]]:  # type: ignore[no-untyped-def]
    files = list(BASE)
    for index, keyword, action, value in changes:
        ds = pydicom.dcmread(io.BytesIO(files[index]))
        try:
            if action == "delete":
                if keyword in ds:
                    delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
            files[index] = to_bytes(ds)
        except Exception:  # a value pydicom itself cannot write: not an input anyone can send
            continue
    return [(f"f{i}", data) for i, data in enumerate(files)]


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(mutations())
def test_the_dicom_reader_raises_only_its_own_errors(changes):
    files = mutate(changes)
    try:
        series = load_series(files)
    except InputError:
        return
    assert series.volume.array.ndim == 3 and series.volume.shape[0] >= 2
