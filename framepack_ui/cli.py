"""Command line: `python -m framepack_ui {generate,plan,make-tiny-models,download} ...`.

Bad arguments or inputs exit with status 2 and one line on stderr, never a traceback.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .errors import UserError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_STOPPED = 0, 1, 2, 130
DEFAULT_MODELS = Path(__file__).resolve().parent.parent / "models"


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints the whole usage block; one line says it better
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    from .memory.plan import PLAN_CHOICES
    from .spec import SECTION_STATE, JobSpec, SAMPLERS

    d = JobSpec(image="", prompt="")
    parser = _OneLineParser(prog="python -m framepack_ui", description="FramePack F1 image-to-video, headless.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every loading and memory decision")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)

    g = sub.add_parser("generate", help="turn an image and a prompt into an MP4")
    g.add_argument("--models", type=Path, default=DEFAULT_MODELS, help="models folder (default: %(default)s)")
    g.add_argument("--image", action="append", default=None,
                   help="start image (PNG, JPEG, WebP...); with --extend: the start image the new sections are "
                        "anchored to (default: the video's first frame). Several --image and/or --prompt make a "
                        "batch: a job for each image x each prompt, written as OUT_1.mp4, OUT_2.mp4...")
    g.add_argument("--prompt", action="append", default=None,
                   help='what happens: one prompt, or prompts over time: "[0s: a woman waves] [2.4s: she smiles]" '
                        '(each change lands at the nearest 1.2 s section boundary; with --extend the times count '
                        'from the extension\'s start); needed unless continuing a past output with --resume, '
                        '--branch or --extend, which keep its prompt unless given')
    g.add_argument("--prompt-blend", type=int, dest="prompt_blend_sections", metavar="SECTIONS",
                   help=f"blend each prompt change over this many sections (0 = switch at once; up to 4; default "
                        f"{d.prompt_blend_sections})")
    # Settings left out are None here: a new job takes JobSpec's defaults, a continued one its source's settings
    g.add_argument("--negative", help="negative prompt, used when --cfg > 1")
    g.add_argument("--seconds", type=float, help=f"length; rounded to 1.2 s sections (default {d.seconds}); with "
                                                 f"--extend: the seconds added")
    g.add_argument("--seed", type=int, help=f"0 to 2^32-1, or -1 for a random seed (default {d.seed})")
    g.add_argument("--steps", type=int, help=f"default {d.steps}")
    g.add_argument("--gs", type=float, help=f"distilled guidance (default {d.gs})")
    g.add_argument("--cfg", type=float, help="real CFG; 1 = off, >1 doubles the model calls")
    g.add_argument("--rs", type=float, help="CFG rescale 0..1")
    g.add_argument("--resolution", type=int, help=f"bucket scale in px (default {d.resolution})")
    g.add_argument("--teacache", action=argparse.BooleanOptionalAction, default=None,
                   help="skip model calls whose input barely changed (faster, hands slightly worse; default on)")
    g.add_argument("--teacache-threshold", type=float, help=f"default {d.teacache_threshold}")
    _add_cache_options(g, d)
    g.add_argument("--crf", type=int, help=f"x264 quality 1..51, lower is better (default {d.crf})")
    g.add_argument("--fast-decode", action=argparse.BooleanOptionalAction, default=None,
                   help="later sections decode 12 latents, not 18 (0.64x the time, 56 dB of the official decode; "
                        "default on)")
    g.add_argument("--sampler", choices=SAMPLERS, help=f"default {d.sampler}")
    g.add_argument("--lora", action="append", default=None, metavar="FILE[:STRENGTH]",
                   help="apply a LoRA to the video model (kohya / musubi-tuner or diffusers / PEFT .safetensors), "
                        "at STRENGTH (default 1); repeat for several")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    g.add_argument("--gpus", default=None, metavar="all|0,1",
                   help="with --split: the GPUs the job is split over (all, or their numbers); one job on one GPU "
                        "takes --device cuda:N")
    g.add_argument("--split", action="store_true",
                   help="with --gpus (2 or more of one memory size): one job over those GPUs, the video model's "
                        "sequence split across them")
    g.add_argument("--offline", action="store_true", help="never download missing model files")
    g.add_argument("--plan", default="auto", choices=PLAN_CHOICES,
                   help="where the models live: auto (from this machine's RAM/VRAM), gpu (all resident), streamed, "
                        "mmap (CPU, weights read from a read-only file map), cpu (RAM copies)")
    g.add_argument("--fp8", action=argparse.BooleanOptionalAction, default=None,
                   help="store the transformer as fp8 (converted once into models/.../fp8/, about half the size; "
                        "computes in bf16/float32, slightly less exact); --no-fp8 keeps bf16 (default: the plan "
                        "chooses fp8 where the bf16 blocks streamed from disk would not stay in the page cache)")
    _add_speed_options(g)
    g.add_argument("--prompt-cache-dir", type=Path, default=None,
                   help="where prompt embeddings are cached (default: MODELS/.cache/prompts); a known prompt never "
                        "loads the 15 GB text encoder")
    g.add_argument("--no-prompt-cache", action="store_true", help="do not read or write prompt embeddings on disk")
    g.add_argument("--section-state", choices=SECTION_STATE, default=None,
                   help="what is kept beside the video to continue it: all (every section's latents, 3.5 MB a "
                        "section at 640 px) or resume (the newest 3: resume, but no branch from earlier sections)")
    g.add_argument("--out", type=Path, help="output .mp4 path")
    more = g.add_mutually_exclusive_group()
    more.add_argument("--resume", type=Path, metavar="OUT.mp4",
                      help="continue an interrupted or stopped output to its planned length, in the same file")
    more.add_argument("--branch", type=Path, metavar="PAST.mp4",
                      help="keep PAST's sections before --from-section K and make the rest anew (with the settings "
                           "given here) as --out; PAST stays")
    more.add_argument("--extend", type=Path, metavar="VIDEO",
                      help="continue a past output or any video by --seconds, as --out holding the whole video")
    g.add_argument("--from-section", type=int, metavar="K", help="with --branch: the first section made anew (1-based)")

    t = sub.add_parser("make-tiny-models", help="write tiny random models in the real layout (for tests)")
    t.add_argument("dir", type=Path)
    t.add_argument("--transformer-mb", type=float, default=None, help="scale the transformer to about N MB")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--full-size", action="store_true",
                   help="every model at its real config and storage dtype instead (random weights, about 43 GB; for "
                        "benchmarks on a machine without the real downloads)")
    t.add_argument("--only", default=None, metavar="NAMES",
                   help="with --full-size: only these components, comma-separated (text_encoder, text_encoder_2, "
                        "tokenizer, tokenizer_2, vae, feature_extractor, image_encoder, transformer)")
    t.add_argument("--device", default=None, help="with --full-size: draw the random values there (cuda: fast)")

    pl = sub.add_parser("plan", help="show where each model would live and the predicted peak RAM/commit/VRAM")
    pl.add_argument("--models", type=Path, default=DEFAULT_MODELS)
    pl.add_argument("--ram", type=float, default=None, help="plan for a machine with this many GB of RAM")
    pl.add_argument("--vram", type=float, default=None, help="... and this many GB of VRAM (0: no GPU)")
    pl.add_argument("--plan", default="auto", choices=PLAN_CHOICES)
    pl.add_argument("--resolution", type=int, default=d.resolution)
    pl.add_argument("--fp8", action=argparse.BooleanOptionalAction, default=None,
                    help="plan with the transformer stored as fp8 (--no-fp8: bf16; default: the plan chooses)")
    _add_speed_options(pl)

    dl = sub.add_parser("download", help="download the model files that are missing")
    dl.add_argument("--models", type=Path, default=DEFAULT_MODELS)
    return parser


def _add_cache_options(parser, d) -> None:
    """The step cache: which one, and MagCache's settings (TeaCache's are --teacache and --teacache-threshold)."""
    from .spec import CACHE_METHODS

    parser.add_argument("--cache", choices=CACHE_METHODS, default=None,
                        help="skip model calls whose result is predictable from the last computed one: teacache (the "
                             "official demo's, default), magcache (MagCache, opt-in until checked on the real weights) "
                             "or off; --teacache/--no-teacache still choose teacache or off")
    parser.add_argument("--magcache-threshold", type=float, default=None,
                        help=f"MagCache: the accumulated error allowed while skipping, 0 to 1 (default "
                             f"{d.magcache_threshold}; 0 computes every step)")
    parser.add_argument("--magcache-max-skip-steps", type=int, default=None, metavar="K",
                        help=f"MagCache: at most K steps skipped in a row (default {d.magcache_max_skip_steps})")
    parser.add_argument("--magcache-retention-ratio", type=float, default=None,
                        help=f"MagCache: the first fraction of the steps is always computed (default "
                             f"{d.magcache_retention_ratio})")
    parser.add_argument("--cache-calibrate", action="store_true", default=None,
                        help="run once without skipping and record MagCache's ratios for this model, step count, "
                             "resolution, storage and LoRA set (under MODELS/.cache/magcache/); later MagCache jobs "
                             "with the same use them (implies --cache magcache)")


def _cache_settings(args) -> dict:
    """The step cache's settings given on the command line. --teacache/--no-teacache alone choose between TeaCache
    and off (also over a continued job's recorded method); with --cache they must agree."""
    given = {name: getattr(args, name) for name in CACHE_ARGS if getattr(args, name, None) is not None}
    if args.cache_calibrate:
        given["cache_calibrate"] = True
        given.setdefault("cache", "magcache")
    if args.teacache is not None:
        if "cache" not in given:
            given["cache"] = ""  # the teacache flag decides (spec.CACHE_METHODS)
        elif (given["cache"] == "teacache") != args.teacache:
            flag = "--teacache" if args.teacache else "--no-teacache"
            raise _input_error(f"{flag} contradicts --cache {given['cache']}: give one of them")
    elif "cache" in given:
        given["teacache"] = given["cache"] == "teacache"  # kept in step for older readers of the settings
    return given


def _add_speed_options(parser) -> None:
    """How the transformer computes; left out, the plan decides from the machine."""
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile each transformer block (default: on a CUDA GPU with Triton)")
    parser.add_argument("--attention", default=None, metavar="NAME",
                        help="attention backend: native, _native_cudnn, _native_flash or _native_efficient, or "
                             "the 8-bit cudnn_fp8 (Hopper and later, nvidia-cudnn-frontend) or sage1 "
                             "(sageattention) (default: diffusers' choice)")
    parser.add_argument("--fp8-matmul", action=argparse.BooleanOptionalAction, default=None,
                        help="with --fp8: multiply in fp8 (default: on GPUs of compute capability 8.9+)")
    parser.add_argument("--pin-streamed", action=argparse.BooleanOptionalAction, default=None,
                        help="hold the streamed transformer blocks in page-locked RAM (default: where 8 GB of RAM "
                             "stays free beside them)")


def _plan_options(args) -> dict:
    """The plan overrides beyond the profile and the resolution (memory.plan.PlanOverrides fields)."""
    return dict(fp8=args.fp8, compile=args.compile, attention=args.attention, fp8_matmul=args.fp8_matmul,
                pin_streamed=args.pin_streamed)


def _plan_overrides(args):
    from .memory.plan import PlanOverrides

    return PlanOverrides(args.plan, resolution=args.resolution, **_plan_options(args))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        _quiet_libraries()
    try:
        return {"generate": _generate, "plan": _plan, "make-tiny-models": _make_tiny,
                "download": _download}[args.command](args)
    except UserError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        return EXIT_STOPPED


def _quiet_libraries() -> None:
    """Library progress bars and notices would bury our one line per step; -v brings them back."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def _generate(args) -> int:
    """One job (or a batch: each image x each prompt) through the same Worker as the web app (planning, downloads,
    the model lifecycle), its events printed as they come; Ctrl+C stops it and keeps the finished sections (and
    drops a batch's jobs still waiting)."""
    jobs = [_job_from_args(one) for one in _batch_args(args)]
    for spec, start, out in jobs:
        spec.validate(image_required=start is None)  # before any heavy import: bad input answers at once
        if out.suffix.lower() != ".mp4":
            raise _input_error("--out must end in .mp4")
    if len(jobs) > 1:
        _out(f"batch: {len(jobs)} jobs ({len(args.image)} image(s) x {len(args.prompt)} prompt(s)): "
             f"{', '.join(out.name for _, _, out in jobs)}")
    out = jobs[0][2]
    split_job = _split_job(args)  # before any heavy import too
    if not args.verbose:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
    from .events import Finished, Phase, Stopped
    from .worker import Worker

    cache = ({"prompt_cache_dir": None} if args.no_prompt_cache else
             {"prompt_cache_dir": args.prompt_cache_dir} if args.prompt_cache_dir else {})
    # the job runs here, on the main thread (background=False): Ctrl+C reaches it as a stop that keeps what is done
    # compile_when_idle=False: after its job the command line ends, so a compile then would only delay the exit
    worker = Worker(args.models, out.parent, device=args.device, profile=args.plan, keep_models_s=0,
                    download_missing=not args.offline, serves_pages=False, background=False,
                    compile_when_idle=False, **cache,
                    **({"run_job": split_job} if split_job else {}))
    seen = []  # every event, printed as it happens
    job_ids: list[str] = []

    def show(event) -> None:
        seen.append(event)
        _show(event)
        if isinstance(event, Stopped) and not any(isinstance(e, Stopped) for e in seen[:-1]):
            for job_id in job_ids:  # Ctrl+C: a batch's waiting jobs are dropped too
                worker.cancel(job_id)

    try:
        for spec, start, job_out in jobs:
            job_ids.append(worker.submit(spec, out_path=job_out, plan_options=_plan_options(args), on_event=show,
                                         start=start))
        worker.run_queued()
    finally:
        worker.shutdown()
    results = [worker.job(job_id).result for job_id in job_ids]
    if len(jobs) > 1:
        ended = [type(r).__name__.lower() for r in results]
        _out(f"batch: {ended.count('finished')} of {len(jobs)} finished")
    result = next((r for r in results if not isinstance(r, Finished)), results[-1])
    started = any(isinstance(event, Phase) and event.name == "settings" for event in seen)
    if isinstance(result, Finished):
        return EXIT_OK
    if isinstance(result, Stopped):
        return EXIT_STOPPED
    # bad input, missing models, or a plan that cannot fit (refused before the job started): a usage error
    refused = result.reason in ("input", "models") or (result.reason == "memory" and not started)
    return EXIT_USAGE if refused else EXIT_FAILED


def _split_job(args):
    """`--split`: checked at once (one line, exit 2), then the worker's run_job for it; None without it."""
    if args.gpus is not None and not args.split:
        raise _input_error("--gpus names the GPUs of a --split job; one job on one GPU takes --device cuda:N")
    if not args.split:
        return None
    from .worker.split import SplitJobRunner, check_split_option

    devices = [0]  # without --gpus: one GPU, which check_split_option refuses in one line
    if args.gpus is not None:
        from .worker.pool import cuda_device_count, parse_gpus

        devices = [int(device.split(":")[1]) for device in parse_gpus(args.gpus, cuda_device_count())]
    check_split_option(devices, True, attention=args.attention)
    return SplitJobRunner(devices)


SETTING_ARGS = ("image", "prompt", "negative", "seconds", "seed", "steps", "gs", "cfg", "rs", "resolution", "sampler",
                "teacache", "teacache_threshold", "crf", "fast_decode", "section_state", "prompt_blend_sections")


CACHE_ARGS = ("cache", "magcache_threshold", "magcache_max_skip_steps", "magcache_retention_ratio")


def _batch_args(args) -> list[argparse.Namespace]:
    """`generate`'s arguments for each job: one, or for several --image / --prompt each image x each prompt, the
    outputs numbered after --out (clip.mp4 -> clip_1.mp4, clip_2.mp4...)."""
    images, prompts = args.image or [None], args.prompt or [None]
    if len(images) * len(prompts) == 1:
        return [argparse.Namespace(**{**vars(args), "image": images[0], "prompt": prompts[0]})]
    if args.resume or args.branch or args.extend:
        raise _input_error("several --image or --prompt make a batch of new jobs: not with --resume, --branch or "
                           "--extend")
    if args.out is None:
        raise _input_error("--out is needed (a batch numbers its outputs after it: OUT_1.mp4, OUT_2.mp4...)")
    pairs = [(image, prompt) for image in images for prompt in prompts]
    return [argparse.Namespace(**{**vars(args), "image": image, "prompt": prompt,
                                  "out": args.out.with_name(f"{args.out.stem}_{n}{args.out.suffix}")})
            for n, (image, prompt) in enumerate(pairs, start=1)]


def _job_from_args(args):
    """(JobSpec, Continuation or None, output path) from `generate`'s arguments. A continued job starts from its
    source's recorded settings (the settings file beside it) and changes those given on the command line."""
    from .spec import Continuation, JobSpec, LoraChoice

    given = {name: getattr(args, name) for name in SETTING_ARGS if getattr(args, name) is not None}
    if args.lora is not None:
        given["loras"] = tuple(LoraChoice.parse(text) for text in args.lora)
    given.update(_cache_settings(args))
    if args.from_section is not None and args.branch is None:
        raise _input_error("--from-section goes with --branch")
    source = args.resume or args.branch or args.extend
    if source is None:
        if "image" not in given or "prompt" not in given:
            raise _input_error("--image and --prompt are needed (or continue a video: --resume, --branch, --extend)")
        if args.out is None:
            raise _input_error("--out is needed")
        return JobSpec(**given), None, args.out
    if args.resume is not None:
        kind, out = "resume", args.resume
        if args.out is not None and args.out.resolve() != args.resume.resolve():
            raise _input_error("--resume continues OUT.mp4 in place: leave out --out")
        if set(given) - {"image"}:
            raise _input_error("--resume continues with the saved settings: change them with --branch instead")
    else:
        kind, out = ("branch", args.out) if args.branch is not None else ("extend", args.out)
        if out is None:
            raise _input_error(f"--{kind} needs --out NEW.mp4 (the source stays as it is)")
        if kind == "branch" and args.from_section is None:
            raise _input_error("--branch needs --from-section K (the first section made anew)")
        if kind == "branch" and "image" in given:
            raise _input_error("a branch keeps its source's start image: leave out --image")
    if not source.is_file():
        raise _input_error(f"video not found: {source}")
    recorded = _recorded_settings(source)
    if kind == "extend":
        recorded.pop("seconds", None)  # --seconds is the length added
        recorded.pop("image", None)  # the new sections' start image: --image, or the video's own
    values = {**recorded, **given}
    if "prompt" not in values:
        raise _input_error(f"{source.name} has no settings file to take the prompt from: give --prompt")
    values.setdefault("image", "")
    return JobSpec(**values), Continuation(kind, str(source), args.from_section), out


def _recorded_settings(video: Path) -> dict:
    """The settings a past output recorded in its settings file (none for a video from elsewhere)."""
    import json

    from .sidecar import sidecar_path

    try:
        recorded = json.loads(sidecar_path(video).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(recorded, dict):
        return {}
    values = {name: recorded[name] for name in SETTING_ARGS + CACHE_ARGS if recorded.get(name) is not None}
    if isinstance(recorded.get("loras"), list):
        from .spec import LoraChoice

        values["loras"] = tuple(LoraChoice(**choice) for choice in recorded["loras"] if isinstance(choice, dict))
    image = recorded.get("input_image_file")
    if image and (video.parent / image).is_file():  # the copy beside it, the original may be gone
        values["image"] = str(video.parent / image)
    return values


def _show(event) -> None:
    from .events import CacheReport, Failed, Finished, Notice, Phase, Progress, SectionSaved, Step, Stopped
    from .worker.events import Estimated

    if isinstance(event, Phase):
        _out(f"download {event.detail}" if event.name == "download" else f"[{event.name}] {event.detail}")
    elif isinstance(event, Progress):
        left = f", about {event.eta_s:.0f}s left" if event.eta_s is not None else ""
        _out(f"{event.task}: {100 * event.done // max(1, event.total)}% of {event.total / 1e9:.1f} GB{left}")
    elif isinstance(event, Notice):
        _out(f"note: {event.message}")
    elif isinstance(event, CacheReport):
        _out(f"section {event.section + 1}/{event.sections}: {event.method} computed {event.computed} of "
             f"{event.calls} model calls")
    elif isinstance(event, Step):
        eta = f", ETA {event.eta_s:.0f}s" if event.eta_s is not None else ""
        _out(f"section {event.section + 1}/{event.sections} step {event.step}/{event.steps} "
             f"({event.elapsed_s:.1f}s{eta})")
    elif isinstance(event, SectionSaved):
        _out(f"section {event.section + 1}/{event.sections} saved: {event.frames_written} frames in {event.path}")
    elif isinstance(event, Finished):
        _out(f"done: {event.path} ({event.frames} frames, {event.elapsed_s:.1f}s); settings in {event.settings_path}")
    elif isinstance(event, Stopped):
        _out(f"stopped: kept {event.frames} frames in {event.path}")
    elif isinstance(event, Failed):
        print(f"error: {event.message}" + (f" (kept {event.path})" if event.path else ""), file=sys.stderr)
    elif isinstance(event, Estimated):
        guess = f"about {event.total_s:.0f}s" if event.total_s is not None else "unknown"
        _out(f"estimate: {guess} ({event.source})")


def _plan(args) -> int:
    from .memory.plan import make_plan
    from .memory.probe import Machine, probe_machine, weights_on_disk

    if args.ram is not None or args.vram is not None:
        if args.ram is None:
            raise _input_error("--vram needs --ram too (the plan is for that machine)")
        machine = Machine.supposed(args.ram, args.vram or 0.0)
    else:
        machine = probe_machine(args.models)
    _out(make_plan(machine, weights_on_disk(args.models), _plan_overrides(args)).explain())
    return EXIT_OK


def _make_tiny(args) -> int:
    if args.full_size:
        return _make_full_size(args)
    if args.only is not None or args.device is not None:
        raise _input_error("--only and --device go with --full-size")
    from .weights.tiny import make_tiny_models

    summary = make_tiny_models(args.dir, transformer_mb=args.transformer_mb, seed=args.seed)
    _out(f"tiny models written to {args.dir} ({summary.get('transformer_bytes', 0) / 1e6:.1f} MB transformer)")
    return EXIT_OK


def _make_full_size(args) -> int:
    """The real configs and dtypes in the real layout: what will be written first, refused in one line where the
    disk has not the room, then each file with its speed."""
    from .weights.full_size import make_full_size_models, parse_only, plan_writes

    if args.transformer_mb is not None:
        raise _input_error("--transformer-mb and --full-size exclude each other")
    plan = plan_writes(args.dir, parse_only(args.only))
    _out(plan.line())
    plan.check_room()  # ModelFilesError (exit 2) when the disk has not the room

    def wrote(path, nbytes, seconds) -> None:
        _out(f"wrote {path} ({nbytes / 1e9:.2f} GB in {seconds:.1f} s, {nbytes / 1e9 / max(seconds, 1e-9):.2f} GB/s)")

    summary = make_full_size_models(plan, device=args.device, seed=args.seed, on_file=wrote)
    rate = f", {summary['GB_per_s']:.2f} GB/s" if summary["GB_per_s"] else ""
    _out(f"full-size models written to {args.dir}: {summary['bytes'] / 1e9:.1f} GB in {summary['seconds']:.0f} s{rate}")
    return EXIT_OK


def _download(args) -> int:
    from .weights.download import ensure_models

    ensure_models(args.models, allow_download=True, progress=lambda p: _out(f"download {p.line()}"))
    _out(f"all model files are in {args.models}")
    return EXIT_OK


def _input_error(message: str):
    from .errors import InputError

    return InputError(message)


def _out(line: str) -> None:
    print(line, flush=True)
