"""FramePack UI web app: parse args -> Worker -> build_ui(worker) -> launch. Nothing else.

    python app.py [--listen] [--port N] [--auth USER:PASS] [--auth-file PATH] [--inbrowser] [--models DIR]
                  [--outputs DIR] [--share] [--profile auto|gpu|streamed|mmap|cpu] [--gpus all|0,1 | --ray ADDRESS]
                  [--max-upload MB]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import socket
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DEFAULT_PORT = 7860
log = logging.getLogger("framepack_ui.app")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="app.py", description="FramePack UI: the web app.")
    parser.add_argument("--listen", action="store_true",
                        help="serve on every network interface (0.0.0.0) so other machines on the LAN can connect; "
                             "default: this machine only (127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default %(default)s)")
    parser.add_argument("--auth", metavar="USER:PASS", help="ask for this user name and password")
    parser.add_argument("--auth-file", metavar="PATH", type=Path,
                        help="ask for a user name and password from this file: one USER:PASS a line "
                             "(blank lines and lines starting with # are skipped); may be used with --auth")
    parser.add_argument("--inbrowser", action="store_true", help="open the app in the default browser")
    parser.add_argument("--models", type=Path, default=ROOT / "models", help="models folder (default ./models)")
    parser.add_argument("--outputs", type=Path, default=ROOT / "outputs", help="videos go here (default ./outputs)")
    parser.add_argument("--share", action="store_true", help="also make a temporary public gradio.live link")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--profile", default="auto",
                        help="memory profile preselected for jobs: auto, gpu, streamed, mmap or cpu (default auto)")
    parser.add_argument("--attention", default=None, metavar="NAME",
                        help="the transformer's attention for every job, as the command line's --attention: e.g. "
                             "cudnn_fp8 (fp8 attention, Hopper and later, needs nvidia-cudnn-frontend)")
    parser.add_argument("--offline", action="store_true",
                        help="download nothing: the page says which model files to copy where")
    parser.add_argument("--keep-models", type=float, default=0, metavar="SECONDS",
                        help="keep the models loaded this long after the last job, for a quick next one "
                             "(default 0: give the memory back at once)")
    parser.add_argument("--gpus", default=None, metavar="all|0,1",
                        help="serve the queue with a worker on each of these CUDA GPUs (all, or their numbers), "
                             "sharing this machine's RAM among them (default: one GPU, as --device)")
    parser.add_argument("--split", action="store_true",
                        help="with --gpus (2 or more of one memory size): each job over all of them, the video "
                             "model's sequence split across the GPUs, instead of a worker on each")
    parser.add_argument("--ray", default=None, metavar="ADDRESS",
                        help="serve the queue with a worker on each GPU of the running Ray cluster at ADDRESS "
                             "(HOST:PORT of its head; Linux, pip install ray): each node uses its own models folder "
                             "(the --models path there) and memory plan")
    parser.add_argument("--max-upload", type=float, default=None, metavar="MB",
                        help="refuse uploads larger than this many MB (default 500), before they reach the disk")
    args = parser.parse_args(argv)
    args.credentials = []
    if args.auth is not None:
        if ":" not in args.auth or not args.auth.split(":", 1)[0]:
            parser.error("--auth must be USER:PASS")
        args.credentials.append(tuple(args.auth.split(":", 1)))
    if args.auth_file is not None:
        try:
            args.credentials += read_auth_file(args.auth_file)
        except (OSError, ValueError) as exc:
            parser.error(f"--auth-file: {exc}")
    if not 0 < args.port < 65536:
        parser.error("--port must be 1 to 65535")
    if args.max_upload is not None and not args.max_upload > 0:
        parser.error("--max-upload must be a size in MB above 0")
    return args


def read_auth_file(path: Path) -> list[tuple[str, str]]:
    """USER:PASS pairs, one a line; blank lines and # comments skipped. ValueError names a bad line."""
    pairs = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user:
            raise ValueError(f"line {number} of {path} is not USER:PASS")
        pairs.append((user, password))
    if not pairs:
        raise ValueError(f"{path} holds no USER:PASS line")
    return pairs


def lan_addresses() -> list[str]:
    """This machine's IPv4 addresses other than loopback: where LAN devices can reach the app."""
    import psutil

    return sorted({a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                   if a.family == socket.AF_INET and not a.address.startswith("127.")})


# Set before gradio or huggingface_hub is imported (both read them once): no analytics, no version check, no
# telemetry. Forced, not defaulted: a local app must not call home whatever the shell environment says.
NO_CALLS_HOME = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1"}


def stay_home() -> None:
    os.environ.update(NO_CALLS_HOME)


def make_worker(args: argparse.Namespace):
    """The app's worker: one on --device, or a pool of one per --gpus device. None, with one line logged, when the
    options cannot be served."""
    from framepack_ui.errors import InputError
    from framepack_ui.worker import Worker, WorkerPool, cuda_device_count, parse_gpus

    options = dict(keep_models_s=args.keep_models, attention=args.attention)
    if args.ray is not None:
        return join_cluster(args, options)
    if args.gpus is None:
        if args.split:
            log.error("--split needs --gpus naming 2 or more GPUs (e.g. --gpus 0,1 --split)")
            return None
        return Worker(args.models, args.outputs, device=args.device, **options)
    if args.device is not None:
        log.error("--gpus and --device cannot be used together: --gpus names the devices")
        return None
    try:
        devices = parse_gpus(args.gpus, cuda_device_count())
    except InputError as exc:
        log.error("%s", exc.message)
        return None
    if args.split:
        return split_worker(args, devices, options)
    if len(devices) == 1:
        return Worker(args.models, args.outputs, device=devices[0], **options)
    return WorkerPool(args.models, args.outputs, devices, **options)


def split_worker(args: argparse.Namespace, devices: list[str], options: dict):
    """`--gpus ... --split`: one worker whose jobs each run over all the devices (worker/split.py), planned on the
    first; None, with one line logged, when the GPUs cannot take a split job."""
    from framepack_ui.errors import InputError
    from framepack_ui.worker import Worker
    from framepack_ui.worker.split import SplitJobRunner, check_split_option

    indexes = [int(device.split(":")[1]) for device in devices]
    try:
        check_split_option(indexes, True, attention=args.attention)
    except InputError as exc:
        log.error("%s", exc.message)
        return None
    return Worker(args.models, args.outputs, device=devices[0], run_job=SplitJobRunner(indexes), **options)


def join_cluster(args: argparse.Namespace, node_options: dict):
    """The app's queue served by the Ray cluster at --ray; None, with one line logged, when it cannot be."""
    from framepack_ui.errors import InputError
    from framepack_ui.worker.cluster import connect

    if args.gpus is not None or args.device is not None:
        log.error("--ray cannot be used with --gpus or --device: the cluster's GPUs serve the queue")
        return None
    try:
        return connect(args.ray, args.models, args.outputs, node_options=node_options)
    except InputError as exc:
        log.error("%s", exc.message)
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("framepack_ui").setLevel(logging.INFO)
    stay_home()
    if args.offline:  # huggingface_hub and the downloader refuse any download, in one line
        os.environ["HF_HUB_OFFLINE"] = "1"

    from framepack_ui.ui import CSS, build_ui
    from framepack_ui.ui.exposure import DEFAULT_MAX_UPLOAD_MB, LoginBackoff, upload_limit_bytes
    from starlette.middleware import Middleware

    args.outputs.mkdir(parents=True, exist_ok=True)
    worker = make_worker(args)
    if worker is None:
        return 2
    if args.profile not in worker.plan_choices():
        log.error("--profile must be one of %s", ", ".join(worker.plan_choices()))
        worker.shutdown()
        return 2
    worker.profile = args.profile
    problem = worker.attention_problem()
    if problem:
        log.error("%s", problem)
        worker.shutdown()
        return 2
    worker.import_engine()  # before the page is served, not as the first job starts (Worker.import_engine)
    try:
        missing = worker.missing_models()
        if missing:  # the page says the same, with a download button
            log.warning("%s", missing)
        demo = build_ui(worker, offline=args.offline)
        demo.queue()
        host = "0.0.0.0" if args.listen else "127.0.0.1"
        # Gradio prints several lines, and a failed share tunnel a paragraph (and frpc's log): say it in our own
        # few lines instead; a launch that fails outright (the port is taken) gets one line too.
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                demo.launch(server_name=host, server_port=args.port, inbrowser=args.inbrowser, share=args.share,
                            auth=args.credentials or None, allowed_paths=[str(args.outputs.resolve())],
                            prevent_thread_lock=True, quiet=True, css=CSS,
                            # uploads are cut off at the limit as they stream in; failed logins slow down
                            max_file_size=upload_limit_bytes(args.max_upload or DEFAULT_MAX_UPLOAD_MB),
                            app_kwargs={"middleware": [Middleware(LoginBackoff)]})
        except OSError as exc:  # e.g. the port is taken
            log.error("could not start the web server: %s", " ".join(str(exc).split()))
            return 1
        log.info("FramePack UI running at http://127.0.0.1:%d", args.port)
        if args.listen:
            for address in lan_addresses():
                log.info("on the LAN: http://%s:%d", address, args.port)
            if not args.credentials:
                log.warning("anyone on this network can use the app; add --auth USER:PASS to ask for a password")
        if args.share:
            if demo.share_url:
                log.info("public link: %s", demo.share_url)
            else:
                log.warning("could not make a share link (no internet, or the tunnel was blocked); serving locally")
        demo.block_thread()  # until Ctrl+C
    finally:
        worker.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
