"""The job store, API keys, settings, uploads and worker rules, without a server."""

from __future__ import annotations

import gzip
import threading
import time
from pathlib import Path

import nibabel as nib
import pytest

from app.jobs.keys import authenticate, create_key, hash_key
from app.jobs.store import Job, JobStore
from app.jobs.worker import WorkerPool, _Worker, dicomweb_cache, result_dir
from app.service.settings import ServiceSettings, load_settings
from app.service.uploads import sniff
from pipelines.errors import InputError, UsageError
from pipelines.phantoms import make_phantom
from tests.conftest import run_tessera


def _job(job_id: str, owner: str = "k1", created: float | None = None, inputs: list[str] | None = None) -> Job:
    return Job(id=job_id, owner=owner, state="queued", model="tiny", options={}, inputs=inputs or ["image.nii.gz"],
               created_at=created if created is not None else time.time())


def test_queue_is_bounded_and_first_in_first_out(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "db.sqlite3")
    assert store.add_job(_job("b" * 32, created=2.0), max_queued=2)
    assert store.add_job(_job("a" * 32, created=1.0), max_queued=2)
    assert not store.add_job(_job("c" * 32, created=3.0), max_queued=2)  # full: refused, not stored
    assert store.get("c" * 32) is None
    first = store.claim_next(worker=0)
    assert first is not None and first.id == "a" * 32 and first.state == "running" and first.attempts == 1
    assert store.add_job(_job("c" * 32, created=3.0), max_queued=2)  # room again
    assert [j.id for j in store.jobs_in("queued")] == ["b" * 32, "c" * 32]


def test_recovery_requeues_interrupted_jobs_and_gives_up_on_crash_loops(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "db.sqlite3")
    for name in "abc":
        store.add_job(_job(name * 32, created=ord(name)), max_queued=10)
    for _ in range(3):
        store.claim_next(worker=0)
    store.request_cancel("c" * 32, delete=False)
    with store._transaction() as db:  # job b has crashed the server twice already
        db.execute("UPDATE jobs SET attempts = 3 WHERE id = ?", ("b" * 32,))
    recovery = store.recover(max_attempts=3)
    assert recovery.requeued == ["a" * 32] and recovery.failed == ["b" * 32]
    assert store.get("a" * 32).state == "queued"  # type: ignore[union-attr]
    failed = store.get("b" * 32)
    assert failed is not None and failed.state == "failed" and failed.error_code == "JOB_CRASHED"
    assert store.get("c" * 32).state == "cancelled"  # type: ignore[union-attr]


def test_cancelling_a_queued_job_is_immediate(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "db.sqlite3")
    store.add_job(_job("a" * 32), max_queued=10)
    job = store.request_cancel("a" * 32, delete=False)
    assert job is not None and job.state == "cancelled" and store.claim_next(0) is None


def test_keys_are_stored_hashed_and_revocable(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "db.sqlite3")
    token = create_key(store, "alice")
    assert token.startswith("tsk_") and len(token) > 40
    assert token.encode() not in (tmp_path / "db.sqlite3").read_bytes()
    key = authenticate(store, token)
    assert key is not None and key.name == "alice"
    assert authenticate(store, token + "x") is None and authenticate(store, "Bearer " + token) is None
    with pytest.raises(UsageError, match="KEY_EXISTS"):
        create_key(store, "alice")
    with pytest.raises(UsageError, match="BAD_KEY_NAME"):
        create_key(store, "alice; drop table")
    store.revoke_key("alice")
    assert authenticate(store, token) is None
    assert store.key_for_hash(hash_key(token)) is None


def test_keys_cli_prints_the_key_alone_on_the_last_line(tmp_path: Path) -> None:
    run = run_tessera("keys", "create", "--data-dir", str(tmp_path), "--name", "lab-3")
    assert run.returncode == 0, run.stderr
    token = run.stdout.strip().splitlines()[-1]
    assert token.startswith("tsk_") and " " not in token
    listing = run_tessera("keys", "list", "--data-dir", str(tmp_path))
    assert "lab-3" in listing.stdout and token not in listing.stdout
    assert run_tessera("keys", "revoke", "--data-dir", str(tmp_path), "nobody").returncode == 2


def test_settings_from_file_environment_and_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "tessera.toml"
    config.write_text('max_queued_jobs = 7\njob_timeout_s = 99\ncors_origins = ["https://viewer.example.org"]\n')
    monkeypatch.setenv("TESSERA_JOB_TIMEOUT_S", "42")
    settings = load_settings(config, port=9001)
    assert settings.max_queued_jobs == 7  # file
    assert settings.job_timeout_s == 42  # environment over file
    assert settings.port == 9001  # flag over both
    assert settings.cors_origins == ["https://viewer.example.org"]
    assert ServiceSettings().cors_origins == []  # CORS off by default
    with pytest.raises(UsageError, match="BAD_SETTINGS"):
        load_settings(None, auth=False, host="0.0.0.0")
    assert load_settings(None, auth=False, host="127.0.0.1").auth is False
    with pytest.raises(UsageError, match="CONFIG_NOT_FOUND"):
        load_settings(tmp_path / "absent.toml")


def test_serve_refuses_no_auth_off_loopback(tmp_path: Path) -> None:
    run = run_tessera("serve", "--no-auth", "--host", "0.0.0.0", "--data-dir", str(tmp_path))
    assert run.returncode == 2 and "BAD_SETTINGS" in run.stderr and "Traceback" not in run.stderr


def test_uploads_are_recognised_by_their_bytes(tmp_path: Path) -> None:
    image = make_phantom(3, spacing=(8.0, 8.0, 8.0)).image
    plain, packed = tmp_path / "a", tmp_path / "b"
    nib.save(image, tmp_path / "x.nii")
    plain.write_bytes((tmp_path / "x.nii").read_bytes())
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert sniff(plain) == ("nifti", False) and sniff(packed) == ("nifti", True)
    dicom = tmp_path / "c"
    dicom.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 500)
    assert sniff(dicom) == ("dicom", False)
    text = tmp_path / "d"
    text.write_text("not an image " * 100)
    with pytest.raises(InputError, match="UPLOAD_NOT_AN_IMAGE"):
        sniff(text)
    broken = tmp_path / "e"
    broken.write_bytes(b"\x1f\x8b" + b"junk" * 100)
    with pytest.raises(InputError, match="UPLOAD_UNREADABLE"):
        sniff(broken)


def _settings(tmp_path: Path, models: Path, **extra: object) -> ServiceSettings:
    return ServiceSettings(data_dir=tmp_path / "data", default_model=str(models / "tiny" / "manifest.json"),
                           device="cpu", **extra)  # type: ignore[arg-type]


def _queued_phantom_job(settings: ServiceSettings, store: JobStore, job_id: str) -> None:
    folder = settings.jobs_dir / job_id / "input"
    folder.mkdir(parents=True)
    nib.save(make_phantom(3, spacing=(4.0, 4.0, 5.0)).image, folder / "image_0000.nii.gz")
    store.add_job(_job(job_id, owner="k1", inputs=["image_0000.nii.gz"]), max_queued=10)


def _run_one_job(tmp_path: Path, models: Path, **extra: object) -> tuple[ServiceSettings, JobStore, Job]:
    """A phantom job queued, claimed and run by an in-process worker; returns the job as it ended."""
    settings = _settings(tmp_path, models, **extra)
    store = JobStore(settings.database)
    _queued_phantom_job(settings, store, "a" * 32)
    worker = _Worker(0, settings, threading.Event(), parent=0)
    job = store.claim_next(0)
    assert job is not None
    time.sleep(0.01)
    worker.run(job)
    done = store.get(job.id)
    assert done is not None
    return settings, store, done


def test_a_job_over_its_time_limit_fails_with_job_timeout(tmp_path: Path, service_models: Path) -> None:
    settings, _, done = _run_one_job(tmp_path, service_models, job_timeout_s=0.001)
    job = done
    assert done is not None and done.state == "failed" and done.error_code == "JOB_TIMEOUT"
    assert not (settings.jobs_dir / job.id / "output").exists()  # nothing half-written left behind


def test_a_job_runs_to_its_artifacts_and_retention_deletes_them(tmp_path: Path, service_models: Path) -> None:
    settings, store, done = _run_one_job(tmp_path, service_models, retention_hours=1.0)
    job = done
    assert done.state == "succeeded" and done.progress == 1.0, done
    assert "mask.nii.gz" in done.artifacts and (result_dir(settings, job.id) / "mask.nii.gz").is_file()
    pool = WorkerPool(settings, store)
    assert pool.sweep_expired() == 0  # fresh
    with store._transaction() as db:
        db.execute("UPDATE jobs SET finished_at = ? WHERE id = ?", (time.time() - 2 * 3600, job.id))
    assert pool.sweep_expired() == 1
    purged = store.get(job.id)
    assert purged is not None and purged.purged_at is not None and purged.artifacts == []
    assert not (settings.jobs_dir / job.id).exists()


def test_one_server_per_data_directory(tmp_path: Path) -> None:
    from app.service.app import ServiceState

    holder = ServiceState(ServiceSettings(data_dir=tmp_path / "data"))
    holder.lock_data_dir()
    run = run_tessera("serve", "--data-dir", str(tmp_path / "data"), "--port", "0")
    assert run.returncode == 2 and "DATA_DIR_IN_USE" in run.stderr and "Traceback" not in run.stderr


def test_a_job_read_ahead_is_charged_an_attempt_only_once_it_is_predicted(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "db.sqlite3")
    for name in "ab":
        store.add_job(_job(name * 32, created=ord(name)), max_queued=10)
    predicted = store.claim_next(worker=0)
    ahead = store.claim_next(worker=0, count_attempt=False)
    assert predicted is not None and ahead is not None and (predicted.attempts, ahead.attempts) == (1, 0)
    assert store.get("b" * 32).state == "running"  # type: ignore[union-attr]
    store.recover(max_attempts=1)  # the server died: the predicted job has used its one attempt, not the other
    assert store.get("a" * 32).state == "failed" and store.get("b" * 32).state == "queued"  # type: ignore[union-attr]
    again = store.claim_next(worker=0, count_attempt=False)
    assert again is not None
    store.count_attempt(again.id)
    assert store.get(again.id).attempts == 1  # type: ignore[union-attr]


def test_retention_deletes_cached_studies_no_kept_job_was_made_from(tmp_path: Path, service_models: Path) -> None:
    settings = _settings(tmp_path, service_models, retention_hours=1.0)
    store = JobStore(settings.database)
    cache = dicomweb_cache(settings)
    for study, series in (("1.2.3", "1.2.3.1"), ("1.2.4", "1.2.4.1"), ("9.9.9", "9.9.9.1")):
        (cache / study / series).mkdir(parents=True)
        (cache / study / series / f"{series}.1.dcm").write_bytes(b"DICM")
    for job_id, study in (("a" * 32, "1.2.3"), ("b" * 32, "1.2.4")):
        job = _job(job_id, inputs=[])
        job.options = {"pacs": {"name": "orthanc", "study": study, "series": None}}
        store.add_job(job, max_queued=10)
    store.add_job(_job("c" * 32), max_queued=10)  # an upload: no study
    pool = WorkerPool(settings, store)
    assert pool.sweep_expired() == 0
    assert sorted(p.name for p in cache.iterdir()) == ["1.2.3", "1.2.4"]  # 9.9.9: no job was made from it
    claimed = store.claim_next(0)
    assert claimed is not None and claimed.id == "a" * 32
    store.finish(claimed.id, "succeeded")
    with store._transaction() as db:
        db.execute("UPDATE jobs SET finished_at = ? WHERE id = ?", (time.time() - 2 * 3600, claimed.id))
    assert pool.sweep_expired() == 1  # job a's files go, and with them the study only it was made from
    assert [p.name for p in cache.iterdir()] == ["1.2.4"]  # job b (queued) still needs its study
    assert (cache / "1.2.4" / "1.2.4.1" / "1.2.4.1.1.dcm").is_file()
