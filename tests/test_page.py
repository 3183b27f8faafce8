"""The results page at ``/`` against a real ``tessera serve``, in headless Chromium (Selenium + chromedriver).

The shipped phantom model (its first label renamed with HTML in it) segments a small phantom uploaded
through the page; the viewer's canvas must then show each label's colour, and lose it when the label is hidden.
The test saves the viewer's screenshot as docs/viewer.png. Skips without Chromium, chromedriver or NiiVue.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nibabel as nib
import numpy as np
import pytest

from app.service.page import CONTENT_SECURITY_POLICY, NIIVUE_BUNDLE, WEB_DIR, results_page
from models.registry import resolve_model
from pipelines.phantom_dicom import write_hnc_study, write_phantom_series
from pipelines.phantoms import STRUCTURES, make_phantom
from pipelines.writers.preview import PALETTE
from tests.service_helpers import ROOT, Server, cli_env, create_key, post_job, wait_for

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--window-size=1400,1800")
HOSTILE_NAME = '<img src=x onerror="document.title=\'owned\'">liver'
HOSTILE_FILE = "<b onclick=alert(1)>phantom</b>.nii.gz"
SCREENSHOT = ROOT / "docs" / "viewer.png"
COLOUR_TOLERANCE = 6


@pytest.fixture(scope="module")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``page-phantom``: the shipped phantom model (a mask worth looking at) with its first label named with HTML."""
    shipped = resolve_model("swin-unetr-phantom")
    folder = tmp_path_factory.mktemp("page_models") / "page-phantom"
    folder.mkdir()
    shutil.copy(shipped.weights_path, folder / shipped.weights_path.name)
    manifest = json.loads(shipped.manifest_path.read_text())
    manifest["name"] = "page-phantom"
    manifest["labels"][0]["name"] = HOSTILE_NAME
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder.parent


@pytest.fixture(scope="module")
def server(models_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("page_service")
    server = Server(folder / "data", cli_env(models_root, folder / "home"), "page-phantom", folder / "server.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def key(server: Server) -> str:
    return create_key(server.data_dir, "page", server.env)


@pytest.fixture(scope="module")
def phantom_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("page_case") / "phantom_7.nii.gz"
    nib.save(make_phantom(7, spacing=(4.0, 4.0, 5.0)).image, path)
    return path


def _needs_page() -> None:
    if not NIIVUE_BUNDLE.is_file():
        pytest.skip(f"NiiVue is not installed ({NIIVUE_BUNDLE} missing): run `make setup`")


def _needs_browser() -> None:
    _needs_page()
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.skip("headless Chromium needs the Debian packages chromium and chromium-driver (.ci/run installs them)")
    pytest.importorskip("selenium", reason="selenium (the dev extra) is not installed")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    _needs_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tempfile.mkdtemp(prefix="tessera-chromium-")
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # CSP violations land in the console
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_script_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def test_the_page_and_its_assets_carry_the_policy(server: Server) -> None:
    _needs_page()
    page = httpx.get(f"{server.base_url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert policy == CONTENT_SECURITY_POLICY
    for directive in ("script-src 'self'", "connect-src 'self'", "img-src 'self' blob: data:", "default-src 'none'"):
        assert directive in policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    scripts = re.findall(r"<script\b[^>]*>(.*?)</script>", page.text, re.S)
    assert scripts and all(not body.strip() for body in scripts), "no inline scripts"
    assert all("src=" in tag for tag in re.findall(r"<script\b[^>]*>", page.text))
    for name, kind in (("app.js", "text/javascript"), ("viewer.js", "text/javascript"), ("page.css", "text/css"),
                       ("niivue.js", "text/javascript")):
        asset = httpx.get(f"{server.base_url}/page/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind), name
        assert asset.headers["content-security-policy"] == policy
        assert asset.headers["x-content-type-options"] == "nosniff"
    for hidden in ("package.json", "index.html", "..%2Fpage.py", "node_modules"):
        assert httpx.get(f"{server.base_url}/page/{hidden}").status_code == 404, hidden
    assert "innerHTML" not in (WEB_DIR / "app.js").read_text() + (WEB_DIR / "viewer.js").read_text()


def test_without_niivue_the_page_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr("app.service.page.NIIVUE_BUNDLE", tmp_path / "absent.js")
    response = results_page()
    assert response.status_code == 503
    body = bytes(response.body).decode()
    assert "npm ci --prefix app/service/web" in body and "make setup" in body and "Traceback" not in body
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY


def test_the_viewer_palette_is_the_previews() -> None:
    text = (WEB_DIR / "viewer.js").read_text()
    block = text[text.index("export const PALETTE"):text.index("];", text.index("export const PALETTE"))]
    colours = [tuple(int(c) for c in match) for match in re.findall(r"\[(\d+), (\d+), (\d+)\]", block)]
    assert colours == list(PALETTE)


def _image_matches_mask(client: httpx.Client, job: dict, source: nib.Nifti1Image | None, tmp_path: Path) -> None:
    image_response = client.get(f"{job['url']}/image")
    assert image_response.status_code == 200, image_response.text
    assert image_response.headers["content-type"] == "application/gzip"
    (tmp_path / "image.nii.gz").write_bytes(image_response.content)
    (tmp_path / "mask.nii.gz").write_bytes(client.get(f"{job['url']}/artifacts/mask.nii.gz").content)
    image, mask = nib.load(tmp_path / "image.nii.gz"), nib.load(tmp_path / "mask.nii.gz")
    assert image.shape == mask.shape
    np.testing.assert_allclose(image.affine, mask.affine, atol=1e-5)
    np.testing.assert_allclose(image.get_qform(), mask.get_qform(), atol=1e-5)
    if source is not None:
        np.testing.assert_allclose(np.asarray(image.dataobj), np.asarray(source.dataobj), atol=1e-3)
    again = client.get(f"{job['url']}/image")
    assert again.content == image_response.content  # written once, then served from the job's folder


def test_the_input_image_is_served_on_the_masks_grid(server: Server, key: str, phantom_file: Path,
                                                     tmp_path: Path) -> None:
    with server.client(key) as client:
        job_id = post_job(client, phantom_file).json()["id"]
        early = client.get(f"/v1/jobs/{job_id}/image")  # queued or running: nothing to show yet
        assert early.status_code == 409 and early.json()["code"] == "JOB_NOT_SUCCEEDED", early.text
        job = wait_for(client, job_id)
        assert job["state"] == "succeeded", job
        _image_matches_mask(client, job, nib.load(phantom_file), tmp_path)
        with server.client(None) as anonymous:
            assert anonymous.get(f"{job['url']}/image").status_code == 401
        other = create_key(server.data_dir, "other", server.env)
        with server.client(other) as stranger:
            assert stranger.get(f"{job['url']}/image").status_code == 404
        assert client.get(f"{job['url']}/image?channel=3").status_code == 422
        assert client.delete(job["url"]).status_code == 204
        assert client.get(f"{job['url']}/image").status_code == 404


def test_the_input_image_of_a_dicom_study(server: Server, key: str, tmp_path: Path) -> None:
    series = tmp_path / "series"
    write_phantom_series(5, series, spacing=(4.0, 4.0, 5.0))
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as out:
        for path in sorted(series.iterdir()):
            out.write(path, f"study/{path.name}")
    with server.client(key) as client:
        job = wait_for(client, post_job(client, archive, formats="nifti").json()["id"])
        assert job["state"] == "succeeded", job
        _image_matches_mask(client, job, None, tmp_path)
        image = np.asarray(nib.load(tmp_path / "image.nii.gz").dataobj)
        assert image.min() < -500 < 0 < image.max()  # CT numbers: air and tissue, not a blank volume
        client.delete(job["url"])


# --- in the browser ---------------------------------------------------------------------------------------


def _wait(driver: Any, condition: str, timeout: float = 120.0) -> Any:
    """Poll a JavaScript expression until it is truthy; its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(f"return {condition};")
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"not true after {timeout} s: {condition}")


def _set_range(driver: Any, element_id: str, value: float) -> None:
    driver.execute_script(
        "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
        "e.dispatchEvent(new Event('input', {bubbles: true}));", element_id, str(value))


def _canvas_pixels(driver: Any) -> np.ndarray:
    """The viewer's canvas as the browser shows it (RGB), after NiiVue has drawn the latest change."""
    from PIL import Image
    from selenium.webdriver.common.by import By

    time.sleep(0.5)  # NiiVue redraws on the next animation frame
    canvas = driver.find_element(By.ID, "gl")
    return np.asarray(Image.open(io.BytesIO(canvas.screenshot_as_png)).convert("RGB")).astype(np.int16)


def _colour_pixels(pixels: np.ndarray, rgb: tuple[int, int, int]) -> int:
    return int((np.abs(pixels - np.array(rgb)).max(axis=-1) <= COLOUR_TOLERANCE).sum())


def _save_screenshot(driver: Any) -> None:
    from PIL import Image
    from selenium.webdriver.common.by import By

    shot = driver.find_element(By.ID, "viewer").screenshot_as_png
    image = Image.open(io.BytesIO(shot)).convert("RGB")
    image.thumbnail((1200, 1600))
    SCREENSHOT.parent.mkdir(exist_ok=True)
    image.save(SCREENSHOT, optimize=True)
    if SCREENSHOT.stat().st_size > 300_000:  # a README image: 256 colours are plenty
        image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(SCREENSHOT, optimize=True)
    assert SCREENSHOT.stat().st_size < 300_000


def _chosen_files(driver: Any) -> list[str]:
    return driver.execute_script("return [...document.querySelectorAll('#chosen-files li')].map(e => e.textContent)")


def _drop_file(driver: Any, content: bytes, name: str) -> None:
    """Drop a file on the drop zone as a user's drag and drop does (a DragEvent carrying a DataTransfer)."""
    driver.execute_script(
        "const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));"
        "const data = new DataTransfer(); data.items.add(new File([bytes], arguments[1]));"
        "document.getElementById('drop-zone').dispatchEvent("
        "new DragEvent('drop', {dataTransfer: data, bubbles: true, cancelable: true}));",
        base64.b64encode(content).decode(), name)


def _sign_in(driver: Any, server: Server, key: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{server.base_url}/")
    driver.find_element(By.ID, "api-key").send_keys(key)
    driver.find_element(By.ID, "key-save").click()
    _wait(driver, "document.getElementById('model').options.length > 0")


def _assert_console_clean(driver: Any) -> None:
    """Nothing the policy refused (an inline script, a fetch elsewhere), and no script error."""
    entries = driver.get_log("browser")
    refused = [e["message"] for e in entries if "Content Security Policy" in e["message"] or e["level"] == "SEVERE"]
    assert not refused, refused


def test_upload_watch_and_view_in_the_browser(server: Server, key: str, browser: Any, phantom_file: Path,
                                              tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    driver = browser
    _sign_in(driver, server, key)
    assert key not in driver.current_url
    assert driver.execute_script("return sessionStorage.getItem('tessera.apiKey')") == key
    assert driver.execute_script("return localStorage.length") == 0
    assert driver.find_element(By.ID, "model").get_attribute("value") == "page-phantom"

    driver.find_element(By.ID, "file-input").send_keys(str(phantom_file))  # the file picker
    assert _chosen_files(driver) == [f"{phantom_file.name} ({phantom_file.stat().st_size / 2**20:.1f} MB)"]
    _drop_file(driver, phantom_file.read_bytes(), HOSTILE_FILE)  # what is uploaded: the dropped file
    assert _chosen_files(driver) == [f"{HOSTILE_FILE} ({phantom_file.stat().st_size / 2**20:.1f} MB)"]
    assert driver.execute_script("return document.querySelectorAll('#chosen-files img').length") == 0
    _wait(driver, "!document.getElementById('submit').disabled")
    driver.find_element(By.ID, "submit").click()
    job_id = _wait(driver, "document.querySelector('#job-rows tr')?.dataset.job")
    row = f"document.querySelector('#job-rows tr[data-job=\"{job_id}\"]')"
    _wait(driver, f"{row} && {row}.dataset.state === 'succeeded'", timeout=240)
    assert HOSTILE_FILE in driver.execute_script(f"return {row}.textContent")  # as text, not markup
    assert driver.execute_script(f"return {row}.querySelector('progress').value") == 1
    driver.execute_script(f"[...{row}.querySelectorAll('button')].find(b => b.textContent === 'Open').click()")
    _wait(driver, "document.getElementById('viewer').dataset.ready === 'true'", timeout=120)

    names = driver.execute_script(
        "return [...document.querySelectorAll('#labels .label-name')].map(e => e.textContent)")
    assert names[0] == HOSTILE_NAME and names[1:] == [s.name for s in STRUCTURES[1:]]
    assert driver.execute_script("return document.querySelectorAll('#labels img, #stats img').length") == 0
    assert driver.title != "owned"
    stats_names = driver.execute_script(
        "return [...document.querySelectorAll('#stats tbody tr')].map(r => r.cells[0].textContent)")
    assert stats_names[0] == HOSTILE_NAME and len(stats_names) == len(STRUCTURES)
    _wait(driver, "document.getElementById('preview').naturalWidth > 0")
    assert driver.execute_script("return document.getElementById('preview').src.startsWith('blob:')")

    with server.client(key) as client:
        job = client.get(f"/v1/jobs/{job_id}").json()
        (tmp_path / "mask.nii.gz").write_bytes(client.get(f"{job['url']}/artifacts/mask.nii.gz").content)
    present = {int(v) for v in np.unique(np.asarray(nib.load(tmp_path / "mask.nii.gz").dataobj))} - {0}
    assert present, "the model labelled nothing: the canvas check needs a mask"

    driver.find_element(By.CSS_SELECTOR, "#views button[data-view='multiplanar']").click()
    _set_range(driver, "opacity", 1.0)
    pixels = _canvas_pixels(driver)
    drawn = {s.value: _colour_pixels(pixels, s.color) for s in STRUCTURES}
    assert any(drawn[v] > 20 for v in present), drawn
    assert all(drawn[v] == 0 for v in set(drawn) - present), drawn  # a colour only where its label is
    shown = max(present, key=lambda v: drawn[v])
    toggle = f"#labels input[data-value='{shown}']"
    driver.find_element(By.CSS_SELECTOR, toggle).click()
    hidden_pixels = _canvas_pixels(driver)
    rgb = STRUCTURES[shown - 1].color
    assert _colour_pixels(hidden_pixels, rgb) == 0
    driver.find_element(By.CSS_SELECTOR, toggle).click()
    assert _colour_pixels(_canvas_pixels(driver), rgb) > 20
    _set_range(driver, "opacity", 0.0)
    assert _colour_pixels(_canvas_pixels(driver), rgb) == 0

    _set_range(driver, "opacity", 0.6)
    _save_screenshot(driver)
    _assert_console_clean(driver)

    driver.execute_script(f"[...{row}.querySelectorAll('button')].find(b => b.textContent === 'Delete').click()")
    _wait(driver, f"!{row} && document.getElementById('viewer').hidden")
    with server.client(key) as client:
        assert client.get(f"/v1/jobs/{job_id}").status_code == 404


def test_the_uncertainty_overlay_in_the_browser(server: Server, key: str, browser: Any, tmp_path: Path) -> None:
    """A PET + CT study through the shipped diffusion model (2 steps, 2 members): the viewer offers the
    uncertainty map's channels by the report's names, and showing it colours the canvas."""
    from selenium.webdriver.common.by import By

    study = tmp_path / "study"
    write_hnc_study(16, study, uid_seed=11)
    archive = tmp_path / "petct.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as out:
        for path in sorted(p for p in study.rglob("*") if p.is_file()):
            out.write(path, f"study/{path.relative_to(study)}")
    with server.client(key) as client:
        response = post_job(client, archive, model="diffusion-hnc-phantom", formats="nifti,stats", steps="2",
                            members="2", seed="5")
        assert response.status_code == 202, response.text
        job = wait_for(client, response.json()["id"])
        assert job["state"] == "succeeded", job
        channels = client.get(f"{job['url']}/artifacts/report.json").json()["settings"]["network_runtime"][
            "uncertainty_channels"]
    driver = browser
    _sign_in(driver, server, key)
    row = f"document.querySelector('#job-rows tr[data-job=\"{job['id']}\"]')"
    _wait(driver, f"{row}?.dataset.state === 'succeeded'")
    driver.execute_script(f"[...{row}.querySelectorAll('button')].find(b => b.textContent === 'Open').click()")
    _wait(driver, "document.getElementById('viewer').dataset.ready === 'true'", timeout=120)
    assert not driver.find_element(By.ID, "uncertainty-box").get_attribute("hidden")
    offered = driver.execute_script("return [...document.getElementById('uncertainty-channel').options]"
                                    ".map(o => o.textContent)")
    assert offered == channels
    driver.find_element(By.CSS_SELECTOR, "#views button[data-view='axial']").click()
    _set_range(driver, "opacity", 0.0)
    without = _canvas_pixels(driver)
    driver.find_element(By.ID, "uncertainty-on").click()
    _set_range(driver, "uncertainty-opacity", 1.0)
    with_map = _canvas_pixels(driver)
    coloured = (with_map.max(axis=-1) - with_map.min(axis=-1)) > 40  # the warm colour map, not the grey image
    assert int(coloured.sum()) > 50 + int(((without.max(axis=-1) - without.min(axis=-1)) > 40).sum())
    driver.find_element(By.ID, "uncertainty-on").click()
    assert int((np.abs(_canvas_pixels(driver) - without).max(axis=-1) > 8).sum()) < 20  # hidden again
    _assert_console_clean(driver)


def test_cancel_a_running_job_in_the_browser(server: Server, key: str, browser: Any, tmp_path: Path) -> None:
    """A long diffusion job (the CPU default of steps and members) cancelled from its row while it runs."""
    study = tmp_path / "study"
    write_hnc_study(17, study, uid_seed=12)
    archive = tmp_path / "petct.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as out:
        for path in sorted(p for p in study.rglob("*") if p.is_file()):
            out.write(path, f"study/{path.relative_to(study)}")
    driver = browser
    _sign_in(driver, server, key)
    with server.client(key) as client:
        job_id = post_job(client, archive, model="diffusion-hnc-phantom", formats="nifti").json()["id"]
        row = f"document.querySelector('#job-rows tr[data-job=\"{job_id}\"]')"
        _wait(driver, f"{row}?.dataset.state === 'running'", timeout=120)
        driver.execute_script(f"[...{row}.querySelectorAll('button')].find(b => b.textContent === 'Cancel').click()")
        _wait(driver, f"!{row}", timeout=120)  # cancelled, then deleted with its files
        assert client.get(f"/v1/jobs/{job_id}").status_code == 404
    _assert_console_clean(driver)
