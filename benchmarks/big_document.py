"""Peak memory of one run over one very long document: raw_pdfs -> parsed_pages -> vlm_outputs.

A document of --pages pages is built from corpus pages, dropped in incoming/ (moto S3), batched by the
real sensor and materialized with the CLI users run (``dagster asset materialize``) against the
simulated GPU server. The run is a child process, so its peak RSS is measured from the outside:

  run process     ru_maxrss of the largest process of the run (the run itself or a render worker),
                  from getrusage(RUSAGE_CHILDREN) once it has exited
  per process     VmHWM of the run process and of each render worker, sampled from /proc

Memory must stay bounded by pages in flight, never by the document's or the batch's size (issue 8:
under 1 GiB for 2,000 pages).

    python benchmarks/big_document.py [--pages 2000] [--dpi 150]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from render import _build_book  # noqa: E402

from mkg_devstack.local_stack import ManagedProcess, free_port, moto_s3_server  # noqa: E402

SIMULATOR = REPO / "benchmarks" / "simulated_vllm.py"


def _sample_peaks(root: int, stop: threading.Event, peaks: dict[int, tuple[str, int]]) -> None:
    """VmHWM (KiB) of ``root`` and its descendants, sampled until ``stop``."""
    while not stop.wait(0.2):
        family = {root}
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                status = (proc / "status").read_text()
                ppid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
                if ppid not in family and int(proc.name) not in family:
                    continue
                family.add(int(proc.name))
                hwm = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
                name = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:60]
            except (OSError, StopIteration, ValueError):
                continue
            previous = peaks.get(int(proc.name), ("", 0))[1]
            peaks[int(proc.name)] = (name, max(previous, hwm))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=2000)
    parser.add_argument("--dpi", type=int, default=150)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        book = scratch / "book.pdf"
        _build_book(book, args.pages)
        print(f"{args.pages}-page document, {book.stat().st_size / 2**20:.1f} MiB; load {os.getloadavg()}")
        moto = moto_s3_server(scratch / "logs").start()
        port = free_port()
        sim = ManagedProcess(
            name="simulated-vllm",
            argv=[
                sys.executable,
                str(SIMULATOR),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--slots",
                "64",
                "--latency",
                "0.05",
            ],
            host="127.0.0.1",
            port=port,
            health_path="/health",
            log_path=scratch / "logs" / "sim.log",
        ).start()
        home = scratch / "dagster_home"
        home.mkdir()
        (home / "dagster.yaml").write_text((REPO / "dagster.yaml").read_text())
        env = {
            **os.environ,
            "DAGSTER_HOME": str(home),
            "MKG_STORAGE__ENDPOINT_URL": moto.url,
            "MKG_STORAGE__BUCKET": "big",
            "MKG_STORAGE__ACCESS_KEY_ID": "testing",
            "MKG_STORAGE__SECRET_ACCESS_KEY": "testing",
            "MKG_VLLM__URL": sim.url,
            "MKG_PDF__DPI": str(args.dpi),
            "MKG_PDF__MAX_PAGES": str(max(args.pages, 2000)),
        }
        try:
            from mkg_pipeline.config import StorageConfig
            from mkg_pipeline.storage import Storage

            storage = Storage.from_config(
                StorageConfig(endpoint_url=moto.url, bucket="big", access_key_id="testing", secret_access_key="testing")
            )
            storage.ensure_bucket()
            storage.put_bytes("incoming/book.pdf", book.read_bytes(), "application/pdf")
            batch = subprocess.run(
                [sys.executable, "-m", "mkg_pipeline.orchestration.batch_cli"],
                env=env,
                cwd=REPO,
                check=True,
                capture_output=True,
                text=True,
            ).stdout.split()[0]
            command = [
                str(Path(sys.executable).parent / "dagster"),
                "asset",
                "materialize",
                "-m",
                "mkg_pipeline",
                "--select",
                "raw_pdfs,parsed_pages,vlm_outputs",
                "--partition",
                batch,
            ]
            stop, peaks = threading.Event(), {}
            started = time.perf_counter()
            process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            sampler = threading.Thread(target=_sample_peaks, args=(process.pid, stop, peaks), daemon=True)
            sampler.start()
            output = process.communicate()[0].decode(errors="replace")
            wall = time.perf_counter() - started
            stop.set()
            sampler.join()
            largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
            if process.returncode != 0:
                print(output[-3000:])
                return 1
            manifest = storage.get_json(storage.batch_key(batch))
            (result,) = manifest["results"].values()
            status = storage.get_json(storage.vlm_status_key(result["doc_id"]))
        finally:
            sim.stop()
            moto.stop()
    print(
        f"run finished in {wall:.0f} s: {status['state']}, {status['pages_done']}/{status['pages_total']} pages "
        f"({status['pages_done'] / wall:.1f} pages/s end to end, S3 = moto, server = 64 x 0.05 s simulated)"
    )
    print(f"largest process of the run (ru_maxrss): {largest:.0f} MiB")
    for pid, (name, kib) in sorted(peaks.items(), key=lambda item: -item[1][1])[:6]:
        print(f"  pid {pid}: VmHWM {kib / 1024:6.0f} MiB  {name}")
    print(json.dumps({"pages": args.pages, "largest_mib": round(largest), "wall_s": round(wall, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
