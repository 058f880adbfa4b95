"""The web page: its endpoints (Starlette's TestClient) and the page itself in a real, headless Chromium.

The runs are trained here in seconds (a tiny class-conditional digits U-Net; a tiny toy MLP). The
browser test drives Debian's chromium through Selenium with Debian's chromedriver (never a browser
download) and saves a screenshot to ``tests/artifacts/web.png`` (or ``$UNNOISE_WEB_SCREENSHOT``);
``$UNNOISE_WEB_RUN`` names an image run to use instead of the tiny one (for a telling screenshot).
"""

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")

from starlette.testclient import TestClient  # noqa: E402

from unnoise.modalities.run import make_config, train  # noqa: E402
from unnoise.web.app import create_app  # noqa: E402

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SCREENSHOT = Path(os.environ.get("UNNOISE_WEB_SCREENSHOT", Path(__file__).parent / "artifacts" / "web.png"))


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    if os.environ.get("UNNOISE_WEB_RUN"):
        return Path(os.environ["UNNOISE_WEB_RUN"])
    run = tmp_path_factory.mktemp("web") / "digits"
    settings = dict(data="digits", model="tiny", T=100, steps=4, batch_size=16, save_every=4, log_every=2)
    train("image", make_config("image", settings), run, progress=False)
    return run


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("web") / "toy"
    train("toy", make_config("toy", dict(model="tiny", steps=4, batch_size=64, T=100)), run, progress=False)
    return run


def _wait(client, job_id, seconds=60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["state"] != "running":
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish in {seconds} s")


@pytest.fixture(scope="module")
def client(image_run, tmp_path_factory):
    with TestClient(create_app(image_run, tmp_path_factory.mktemp("out"))) as c:
        yield c


def test_the_page_and_what_the_run_offers(client):
    page = client.get("/")
    assert page.status_code == 200 and "<progress" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no external script, style or font
    info = client.get("/api/info").json()
    assert info["modality"] == "image" and "dpmpp_2m" in info["samplers"] and len(info["classes"]) == 10
    assert {"class_id", "guidance", "grid", "eta"} <= set(info["options"]) and "trajectory" not in info["options"]


def test_a_sample_runs_with_progress_frames_and_files(client):
    answer = client.post("/api/sample", json={"sampler": "euler", "nfe": "6", "n": "4", "seed": "1", "class_id": "3"})
    assert answer.status_code == 200, answer.text
    job = _wait(client, answer.json()["id"])
    assert job["state"] == "done" and job["progress"] == 1 and job["evaluations"] == 6, job
    assert [f["name"] for f in job["files"]] == ["sample.png", "sample.npz"]
    png = client.get(job["files"][0]["url"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
    assert "attachment" in png.headers["content-disposition"]
    assert job["frames"] >= 1 and client.get(f"/api/jobs/{job['id']}/frames/0.png").content[:4] == b"\x89PNG"
    assert client.get(f"/api/jobs/{job['id']}/frames/latest.png").status_code == 200


@pytest.mark.parametrize(
    "form, message",
    [
        ({"sampler": "plms"}, "unknown sampler 'plms'; allowed: ddpm, ddim"),
        ({"nfe": "0"}, "nfe must be a whole number from 1 to 1000, got 0"),
        ({"nfe": "ten"}, "nfe must be a whole number from 1 to 1000, got 'ten'"),
        ({"seed": "abc"}, "seed must be a whole number from 0 to"),
        ({"n": "100000"}, "n must be a whole number from 1 to 64"),
        ({"guidance": "-1"}, "guidance must be a number from 0 to inf"),
        ({"guidance": "nan"}, "guidance must be a number"),
        ({"class_id": "12"}, "class_id must be a whole number from 0 to 9"),
        ({"grid": "cubic"}, "unknown grid 'cubic'"),
        ({"sampler": "dpmpp_2m", "eta": "0.5"}, "eta applies to"),
        ({"mr": "name[x]"}, "image runs take class_id, guidance, eta, grid; not mr"),
    ],
)
def test_bad_input_gets_a_message_never_a_traceback(client, form, message):
    answer = client.post("/api/sample", json=form)
    assert answer.status_code == 400 and message in answer.json()["error"], answer.text
    assert "Traceback" not in answer.text and "\n" not in answer.json()["error"]


def test_a_body_that_is_not_a_form_gets_a_message(client):
    for body in (b"{not json", b"[1, 2]"):
        answer = client.post("/api/sample", content=body, headers={"content-type": "application/json"})
        assert answer.status_code == 400 and answer.json()["error"] == "send the form as a JSON object"


def test_no_path_outside_the_output_folder_is_served(client, image_run):
    job = _wait(client, client.post("/api/sample", json={"nfe": "2", "n": "1"}).json()["id"])
    for path in (
        f"/files/{job['id']}/../../config.json",
        f"/files/{job['id']}/..%2F..%2Fconfig.json",
        f"/files/{job['id']}/%2E%2E/sample.png",
        f"/files/{job['id']}/config.json",
        "/files/../config.json",
        f"/files/{job['id']}/{image_run / 'config.json'}",
        "/files/nojob/sample.png",
        f"/api/jobs/{job['id']}/frames/..%2F..%2Fconfig.json.png",
        "/api/jobs/nojob",
        "/../../etc/passwd",
    ):
        answer = client.get(path)
        assert answer.status_code == 404, path
        assert b'"train"' not in answer.content and b"root:" not in answer.content, path


def test_a_second_sample_while_one_runs_is_refused(client):
    first = client.post("/api/sample", json={"nfe": "200", "n": "16"}).json()
    second = client.post("/api/sample", json={"nfe": "2", "n": "1"})
    assert second.status_code == 400 and "wait until it is done" in second.json()["error"]
    _wait(client, first["id"])


def test_a_modality_error_is_a_message_on_the_job(toy_run, tmp_path):
    with TestClient(create_app(toy_run, tmp_path)) as toy:
        info = toy.get("/api/info").json()
        assert info["modality"] == "toy" and info["classes"] == [] and info["options"] == ["eta", "grid"]
        job = _wait(toy, toy.post("/api/sample", json={"sampler": "heun", "nfe": "5", "n": "64"}).json()["id"])
        assert job["state"] == "done" and {f["name"] for f in job["files"]} == {"sample.png", "sample.npz"}
        assert job["frames"] >= 1  # 2-D points: a scatter
        job = _wait(toy, toy.post("/api/sample", json={"grid": "diffwave", "nfe": "7"}).json()["id"])
        assert job["state"] == "error" and "diffwave" in job["error"] and "\n" not in job["error"]
        assert "Traceback" not in str(job)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(image_run, tmp_path):
    uvicorn = pytest.importorskip("uvicorn")
    port = _free_port()
    config = uvicorn.Config(create_app(image_run, tmp_path), host="127.0.0.1", port=port, log_level="warning")
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not instance.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert instance.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}"
    instance.should_exit = True
    thread.join(10)


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.skip(f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER})")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # with the driver's path below, Selenium Manager downloads nothing
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_the_page_in_a_real_browser(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, 60, poll_frequency=0.02)
    browser.get(server)
    wait.until(lambda d: len(Select(d.find_element(By.ID, "sampler")).options) > 5)
    Select(browser.find_element(By.ID, "class_id")).select_by_index(0)  # every class in turn

    # bad input: a message on the page, the sampler never starts
    nfe = browser.find_element(By.ID, "nfe")
    nfe.clear()
    nfe.send_keys("0")
    browser.find_element(By.ID, "go").click()
    wait.until(EC.text_to_be_present_in_element((By.ID, "message"), "nfe must be a whole number"))

    nfe.clear()
    nfe.send_keys("100")
    samples = browser.find_element(By.ID, "n")
    samples.clear()
    samples.send_keys("20")
    Select(browser.find_element(By.ID, "sampler")).select_by_value("dpmpp_2m")
    browser.find_element(By.ID, "go").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results img.result"))
    seen = browser.execute_script("return window.progressSeen")
    assert any(0 < p < 1 for p in seen) and seen[-1] == 1, seen  # the bar moved while sampling, then filled
    image = browser.find_element(By.CSS_SELECTOR, "#results img.result")
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", image))
    assert browser.find_element(By.ID, "message").text == ""
    assert browser.find_element(By.ID, "status").text == "done"
    assert browser.find_elements(By.CSS_SELECTOR, "#strip img")  # the trajectory's frames
    links = [a.get_attribute("download") for a in browser.find_elements(By.CSS_SELECTOR, "#results a")]
    assert links == ["sample.png", "sample.npz"]
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(SCREENSHOT))


def test_raw_dot_dot_paths_are_refused_by_the_real_server(server):
    """httpx tidies ``..`` away before sending; http.client sends the path as written."""
    import http.client

    host, port = server.removeprefix("http://").split(":")
    for path in ("/files/x/../../config.json", "/files/../config.json", "/api/jobs/../../config.json", "/%2E%2E/x"):
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        connection.request("GET", path)
        answer = connection.getresponse()
        body = answer.read()
        connection.close()
        assert answer.status == 404 and b'"train"' not in body, path


def test_unnoise_serve_refuses_a_bad_run_or_a_taken_port_in_one_line(image_run, tmp_path, capsys):
    from unnoise.cli.main import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for argv, says in [
            (["serve", "--run", str(tmp_path / "nope"), "--port", port], "cannot serve on 127.0.0.1:"),
            (["serve", "--run", str(tmp_path / "nope"), "--port", str(_free_port())], "no run folder"),
        ]:
            assert main(argv) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and says in err[0], err
