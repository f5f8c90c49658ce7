"""ctseg's DICOM-SEG drawn by a real viewer: OHIF (the built ``@ohif/app``, .ci/ohif.sh) in Debian's Chromium.

nginx serves OHIF and proxies ``/dicom-web/`` to a real Orthanc on the same origin (as docker/ohif does in the
compose ``pacs`` profile). Orthanc holds a CT phantom with a bright block in the patient's left anterior and the SEG
ctseg writes for that block. The browser opens the study, loads the SEG, and the test asserts from the page (the
segment list shows the SEG's labels) and from screenshots (the pixels the SEG's overlay coloured lie on the block,
found in the same screenshot), with the row direction negated and both slice orders: a SEG frame put on the wrong
slice or flipped in-plane lands beside the block (the block also slants across slices, so slices differ).

Screenshots are kept: under pytest's temporary folder (logged) and, when ``CTSEG_VIEWER_ARTEFACTS`` names a
folder, copied there. Under ``CI=true`` a missing Chromium, chromedriver, nginx, selenium or OHIF's files fail.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
import SimpleITK as sitk
from bundles import labels_only_bundle
from common import REPO, free_port, require_tool, wait_for
from dicom_factory import series_from_image, to_bytes
from pacs import VIEWER_DICOMWEB, Orthanc
from phantoms import make_phantom
from PIL import Image

from server.imaging.dicom_reader import load_series
from server.imaging.seg import build_seg

log = logging.getLogger(__name__)

os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never fetch a browser or a driver

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").is_file() else None)
OHIF_DIST = Path(os.environ.get("CTSEG_OHIF_DIST")
                 or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ctseg" / "ohif" / "dist")
APP_CONFIG = REPO / "docker" / "ohif" / "app-config.js"
WAIT_S = 90.0  # every wait in the browser: a 2-core CI machine renders WebGL in software

BLOCK_HU = 900.0
BLOCK_CENTRE_LPS = (30.0, -22.0)  # patient's left (+x) anterior (-y), mm
BLOCK_HALF = (10.0, 9.0)  # mm
BLOCK_SLANT = 0.6  # mm of x per mm of z: each slice shows the block elsewhere

# Directions (columns: row, column, slice axis in LPS) of the three acquisitions.
VARIANTS = {
    "head-first": np.diag([1.0, 1.0, -1.0]),  # first instance at the head, as a head-first supine scan writes
    "feet-first": np.eye(3),  # first instance at the feet
    "negated-rows": np.diag([-1.0, 1.0, 1.0]),  # rows run from the patient's left to the right
}


@dataclass(frozen=True)
class Study:
    variant: str
    study_uid: str
    segment_labels: tuple[str, ...]  # as the SEG's SegmentSequence writes them
    seg_description: str


def block_phantom(direction: np.ndarray) -> sitk.Image:
    """A body with a slanted bright block in the patient's left anterior, on a grid with ``direction``."""
    body, _ = make_phantom((48, 48, 12), (3.5, 3.5, 5.0), organs=(), noise=4.0, seed=1)
    size = np.asarray(body.GetSize())
    spacing = np.asarray(body.GetSpacing())
    origin = -direction @ ((size - 1) * spacing / 2)  # the body is symmetric: only the grid changes
    body.SetDirection(tuple(direction.flatten()))
    body.SetOrigin(tuple(origin))
    arr = sitk.GetArrayFromImage(body)  # [z, y, x]
    kk, jj, ii = np.meshgrid(*(np.arange(n) for n in arr.shape), indexing="ij")
    pts = origin + np.stack([ii, jj, kk], -1) * spacing @ direction.T  # [z, y, x, 3] in LPS
    x_centre = BLOCK_CENTRE_LPS[0] + BLOCK_SLANT * pts[..., 2]
    block = (np.abs(pts[..., 0] - x_centre) <= BLOCK_HALF[0]) & (np.abs(pts[..., 1] - BLOCK_CENTRE_LPS[1]) <= BLOCK_HALF[1])
    arr[block] = BLOCK_HU
    image = sitk.GetImageFromArray(arr)
    image.CopyInformation(body)
    return image


def store_study(orthanc: Orthanc, variant: str) -> Study:
    """CT and ctseg's BINARY SEG of the block (its label map: the block's voxels) into Orthanc."""
    datasets = series_from_image(block_phantom(VARIANTS[variant]), description=f"Phantom CT {variant}")
    for ds in datasets:  # one patient per study: the viewer's study list holds just this one
        ds.PatientID = f"PHANTOM-{variant.upper()}"
        ds.PatientName = f"Phantom^{variant.title().replace('-', '')}"
    blobs = [to_bytes(ds) for ds in datasets]
    for blob in blobs:
        orthanc.upload(blob)
    series = load_series([(f"f{i}", blob) for i, blob in enumerate(blobs)])
    labels = (series.volume.array > BLOCK_HU / 2).astype(np.uint8)
    assert labels.any(axis=(1, 2)).all(), "the block must be on every slice"
    seg = build_seg(series, labels, labels_only_bundle(2), result_id=f"viewer-{variant}")
    orthanc.upload(seg)
    ds = pydicom.dcmread(io.BytesIO(seg))
    return Study(variant, datasets[0].StudyInstanceUID, tuple(s.SegmentLabel for s in ds.SegmentSequence),
                 ds.SeriesDescription)


class Nginx:
    """Debian's nginx on a free loopback port: OHIF's files, ctseg's app-config.js, /dicom-web/ -> Orthanc."""

    def __init__(self, root: Path, dist: Path, orthanc: Orthanc) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        root.mkdir(parents=True, exist_ok=True)
        # A master started as root hands requests to workers running as "nobody", who cannot read a root-only home.
        user = "user root;" if os.geteuid() == 0 else ""
        self.config = root / "nginx.conf"
        self.config.write_text(f"""
{user}
worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 128; }}
http {{
  include /etc/nginx/mime.types;
  access_log {root}/access.log;
  client_body_temp_path {root}/client_body; proxy_temp_path {root}/proxy; fastcgi_temp_path {root}/fastcgi;
  uwsgi_temp_path {root}/uwsgi; scgi_temp_path {root}/scgi;
  server {{
    listen 127.0.0.1:{self.port};
    root {dist};
    location = /app-config.js {{ alias {APP_CONFIG}; }}
    location /dicom-web/ {{
      limit_except GET {{ deny all; }}
      proxy_pass http://127.0.0.1:{orthanc.http_port}/dicom-web/;
      proxy_set_header Host $http_host;
      proxy_read_timeout 120s;
    }}
    location / {{ try_files $uri $uri/ /index.html; }}
  }}
}}
""")
        self.process: subprocess.Popen | None = None

    def start(self) -> Nginx:
        with open(self.root / "nginx.out", "ab") as out:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                [NGINX, "-p", str(self.root), "-c", str(self.config)], stdout=out, stderr=subprocess.STDOUT)
        wait_for(self._answers, 30.0, what="nginx serving OHIF")
        return self

    def _answers(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"nginx exited with {self.process.returncode}: "
                                 f"{(self.root / 'nginx.out').read_text()[-2000:]}")
        try:
            return requests.get(f"{self.url}/app-config.js", timeout=1).ok
        except requests.RequestException:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


@pytest.fixture(scope="module")
def viewer(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Orthanc holding the three studies and nginx serving OHIF in front of it."""
    require_tool(CHROMIUM, "Chromium (Debian package chromium)")
    require_tool(CHROMEDRIVER, "chromedriver (Debian package chromium-driver)")
    require_tool(NGINX, "nginx (Debian package nginx)")
    require_tool(str(OHIF_DIST) if (OHIF_DIST / "index.html").is_file() else None,
                 f"OHIF's built files in {OHIF_DIST} (bash .ci/ohif.sh)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        require_tool(None, "selenium (pip)")
    root = tmp_path_factory.mktemp("viewer")
    orthanc = Orthanc(root / "orthanc", dicomweb=VIEWER_DICOMWEB).start()
    nginx = None
    try:
        studies = {variant: store_study(orthanc, variant) for variant in VARIANTS}
        nginx = Nginx(root / "nginx", OHIF_DIST, orthanc).start()
        yield nginx, studies
    finally:
        if nginx is not None:
            nginx.stop()
        orthanc.stop()


def chromium():  # type: ignore[no-untyped-def]
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900",
                "--use-gl=angle", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",  # software WebGL
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):  # loopback only
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def screenshot(driver) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.asarray(Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")).astype(np.int16)


def viewport_interior(driver) -> tuple[slice, slice]:  # type: ignore[no-untyped-def]
    """The viewport's pixels less a margin where OHIF draws its text and buttons over the image."""
    rect = driver.execute_script(
        "const r = document.querySelector('[data-cy=viewport-pane]').getBoundingClientRect();"
        "return [r.left, r.top, r.right, r.bottom, window.devicePixelRatio];")
    left, top, right, bottom, ratio = (float(v) for v in rect)
    margin = 80
    return (slice(int(top * ratio) + margin, int(bottom * ratio) - margin),
            slice(int(left * ratio) + margin // 2, int(right * ratio) - margin // 2))


def chroma(rgb: np.ndarray) -> np.ndarray:
    return rgb.max(-1) - rgb.min(-1)


def bright_block(rgb: np.ndarray) -> tuple[int, int, int, int] | None:
    """Bounding box (x0, x1, y0, y1) of the white block (grey and near full brightness), or None."""
    mask = (chroma(rgb) < 10) & (rgb.mean(-1) > 200)
    if mask.sum() < 200:
        return None
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())


def overlay_pixels(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Pixels the SEG coloured: grey before, coloured after."""
    return (np.abs(after - before).sum(-1) > 30) & (chroma(after) > 15) & (chroma(before) < 10)


def stable(driver, region) -> np.ndarray:  # type: ignore[no-untyped-def]
    """A screenshot of ``region`` once two in a row agree (the viewer has finished drawing)."""
    shots = [screenshot(driver)[region]]

    def settled() -> bool:
        shots.append(screenshot(driver)[region])
        return bool(np.array_equal(shots[-1], shots[-2]))

    wait_for(settled, WAIT_S, every=0.5, what="the viewport to stop changing")
    return shots[-1]


def keep(name: str, rgb: np.ndarray, folder: Path) -> Path:
    path = folder / name
    Image.fromarray(rgb.astype(np.uint8)).save(path)
    extra = os.environ.get("CTSEG_VIEWER_ARTEFACTS")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(extra) / name)
    return path


@pytest.mark.timeout(240)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ohif_draws_the_seg_on_the_block(viewer, variant: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    nginx, studies = viewer
    study = studies[variant]
    log.info("viewer screenshots of %s in %s", variant, tmp_path)
    driver = chromium()
    try:
        wait = WebDriverWait(driver, WAIT_S)
        clickable = lambda how, what: wait.until(ec.element_to_be_clickable((how, what)))
        driver.get(f"{nginx.url}/viewer?StudyInstanceUIDs={study.study_uid}")
        clickable(By.CSS_SELECTOR, ".shepherd-button-secondary").click()  # a fresh profile gets the tour: skip it
        clickable(By.CSS_SELECTOR, "[data-cy=panelSegmentation-btn]").click()  # the segment list, before the shot
        wait_for(lambda: bright_block(screenshot(driver)[viewport_interior(driver)]), WAIT_S, every=0.5,
                 what="the CT drawn with its block")
        region = viewport_interior(driver)
        before = stable(driver, region)
        block = bright_block(before)
        assert block is not None

        seg_thumbnail = clickable(
            By.XPATH, "//*[@data-cy='study-browser-thumbnail-no-image'][contains(., 'SEG')]")
        ActionChains(driver).double_click(seg_thumbnail).perform()
        clickable(By.XPATH, "//button[normalize-space()='Yes']").click()  # "Do you want to open this Segmentation?"
        panel = lambda: driver.find_element(By.ID, "viewerLayoutResizableRightPanel").text
        wait_for(lambda: all(label in panel() for label in study.segment_labels), WAIT_S, every=0.5,
                 what=f"the segment list to show {study.segment_labels}")
        wait.until(ec.invisibility_of_element_located((By.XPATH, "//button[normalize-space()='Yes']")))
        wait_for(lambda: overlay_pixels(before, screenshot(driver)[region]).sum() > 100, WAIT_S, every=0.5,
                 what="the SEG's overlay drawn")
        after = stable(driver, region)
        full = screenshot(driver)
        keep(f"{variant}-before.png", before, tmp_path)
        keep(f"{variant}-after.png", after, tmp_path)
        keep(f"viewer-seg-{variant}.png", full, tmp_path)

        assert "Segmentations" in panel() and study.seg_description in driver.find_element(By.TAG_NAME, "body").text
        overlay = overlay_pixels(before, after)
        ys, xs = np.nonzero(overlay)
        x0, x1, y0, y1 = block
        block_area = (x1 - x0 + 1) * (y1 - y0 + 1)
        on_block = (xs >= x0 - 4) & (xs <= x1 + 4) & (ys >= y0 - 4) & (ys <= y1 + 4)  # the outline may overhang
        cx, cy = xs.mean(), ys.mean()
        log.info("%s: block x %d-%d y %d-%d; overlay %d px, centroid (%.1f, %.1f), %.3f on the block", variant,
                 x0, x1, y0, y1, overlay.sum(), cx, cy, on_block.mean())
        assert x0 <= cx <= x1 and y0 <= cy <= y1, f"overlay centroid ({cx:.0f}, {cy:.0f}) off the block {block}"
        assert on_block.mean() >= 0.95, f"only {on_block.mean():.2f} of the overlay lies on the block"
        assert overlay.sum() >= 0.5 * block_area, "the overlay covers less than half of the block"
    finally:
        entries = driver.get_log("browser")
        driver.quit()
    errors = [e["message"] for e in entries if e["level"] == "SEVERE"]
    log.info("%s: %d browser console errors: %s", variant, len(errors), errors)
    assert not [m for m in errors if "seg" in m.lower()], f"console errors about the SEG: {errors}"
