"""The page's components, laid out; no events here (see wiring.py)."""
from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from ..spec import CACHE_METHODS, MAGCACHE_MAX_SKIP_LIMIT, MAX_BLEND_SECTIONS, SAMPLERS, SEED_MAX, JobSpec
from . import present

CSS = """
#gauges, #progress { font-variant-numeric: tabular-nums; }
#preview img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
#plan pre { font-size: 12px; }
.fp-timeline .fp-bar { display: flex; height: 18px; border-radius: 4px; overflow: hidden; font-size: 11px; }
.fp-timeline .fp-bar span { text-align: center; color: white; border-right: 1px solid white; }
.fp-timeline .fp-bad span { background: #bbb; }
.fp-timeline .fp-marks { position: relative; height: 16px; font-size: 11px; }
.fp-timeline .fp-mark { position: absolute; transform: translateX(-50%); white-space: nowrap; }
.fp-timeline ul { margin: 2px 0; padding-left: 0; list-style: none; font-size: 13px; }
.fp-timeline .fp-problem { color: #c0392b; font-size: 13px; }
.fp-plot { font-size: 12px; } .fp-plot svg { max-width: 100%; height: auto; }
/* gauges and download bars (present.gauges_html, present.download_html) */
.fp-bars { display: grid; grid-template-columns: auto minmax(40px, 1fr) auto; gap: 3px 8px; align-items: center;
           font-size: 13px; }  /* one grid for all bars: names, tracks and figures line up */
.fp-bars .fp-gauge { display: contents; }
.fp-gauge-name { font-weight: 600; white-space: nowrap; }
.fp-gauge-track { height: 12px; border-radius: 6px; background: #8883; overflow: hidden; }
.fp-gauge-fill { display: block; height: 100%; background: #2e86de; transition: width 0.4s; }
.fp-near .fp-gauge-fill { background: #e67e22; }
.fp-full .fp-gauge-fill { background: #c0392b; }
.fp-done .fp-gauge-fill { background: #27ae60; }
.fp-gauge-figure { white-space: nowrap; text-align: right; font-variant-numeric: tabular-nums; }
.fp-gauge-note { font-size: 12px; margin: 2px 0; opacity: 0.8; }
.fp-warning { color: #c0392b; font-weight: 600; font-size: 13px; margin: 4px 0; }
.fp-download-line, .fp-download-speed { margin: 2px 0; font-size: 13px; }
/* the jobs table fits the column it is in: fixed layout, headers on one line, the prompt cut with an ellipsis */
.fp-jobs { width: 100%; table-layout: fixed; border-collapse: collapse; font-size: 13px; }
.fp-jobs th { white-space: nowrap; text-align: left; font-weight: 600; }
.fp-jobs th, .fp-jobs td { padding: 2px 4px; border-bottom: 1px solid #8884; vertical-align: top;
                           overflow: hidden; text-overflow: ellipsis; }
.fp-jobs .fp-id { width: 2.2em; }
.fp-jobs .fp-status { width: 5.2em; }
.fp-jobs .fp-length { width: 3.8em; white-space: nowrap; }
.fp-jobs .fp-act { width: 4.6em; }
.fp-jobs td.fp-prompt { white-space: nowrap; }
.fp-jobs td.fp-progress { overflow-wrap: anywhere; }
.fp-job-act { padding: 1px 6px; border-radius: 4px; border: 1px solid #8886; cursor: pointer; font-size: 12px; }
.fp-job-act.fp-stop { color: #c0392b; }
#models_files code, #models_notice code { white-space: normal; overflow-wrap: anywhere; }  /* long paths wrap */
/* a phone (390 px): nothing wider than the screen */
@media (max-width: 600px) {
  .gradio-container { padding-left: 4px !important; padding-right: 4px !important; }
  .fp-jobs .fp-id { display: none; }
  .fp-gauge-figure { white-space: normal; }  /* 'VRAM 6.90 / 8.00 GB · PyTorch 5.20 GB' takes two lines */
  .fp-jobs .fp-length { width: 3.2em; }
  #preview img { max-height: 120px; }
}
"""

# The jobs table's Stop/Remove buttons: one listener on the component (its rows are re-rendered every tick).
JOBS_JS = """
element.addEventListener('click', (event) => {
  const button = event.target.closest('button.fp-job-act');
  if (button) trigger('click', {job: button.dataset.job, act: button.dataset.act});
});
"""

# When the followed job ends (its progress line turns to Done, Stopped or Failed while the page watches): the tab's
# title says so (seen from another tab, also over plain-HTTP LAN), a notification where the browser allows one
# (a secure context: localhost or HTTPS; permission is asked at the Generate click, a user gesture), and a short
# tone if the box is ticked. The title comes back at the next click or key.
JOB_END_JS = """
const base = document.title;
let seen = null;
const ended = /^Job (\\d+) · (Done|Stopped|Failed):/;
document.addEventListener('click', (event) => {
  if (event.target.closest('#generate') && window.isSecureContext && 'Notification' in window
      && Notification.permission === 'default') Notification.requestPermission();
});
for (const kind of ['pointerdown', 'keydown']) document.addEventListener(kind, () => { document.title = base; });
function tone() {
  const audio = new (window.AudioContext || window.webkitAudioContext)();
  const osc = audio.createOscillator();
  osc.frequency.value = 880;
  osc.connect(audio.destination);
  osc.start();
  osc.stop(audio.currentTime + 0.25);
}
setInterval(() => {
  const box = document.querySelector('#progress');
  const line = box ? box.innerText.trim() : '';
  const match = line.match(ended);
  const job = (line.match(/^Job (\\d+)/) || [])[1] || null;
  const state = match ? 'ended' : (job ? 'live' : null);
  if (match && seen && seen.job === job && seen.state === 'live') {
    document.title = `${match[2] === 'Done' ? '✓ Done' : match[2]}: job ${job} · ${base}`;
    if (window.isSecureContext && 'Notification' in window && Notification.permission === 'granted') {
      new Notification(`FramePack UI: job ${job} ${match[2].toLowerCase()}`, {body: line.split('\\n')[0]});
    }
    const sound = document.querySelector('#notify_sound input');
    if (sound && sound.checked) { try { tone(); } catch (e) {} }
  }
  seen = {job, state};
}, 500);
"""


@dataclass
class Page:
    """Every component the wiring needs, by name."""
    models_banner: gr.Column  # shown only while model files are missing
    models_notice: gr.Markdown
    download: gr.Button
    download_cancel: gr.Button  # stops the download; the next one resumes it
    download_progress: gr.HTML  # present.download_html: a line and a bar per model
    image: gr.Image
    settings_file: gr.File  # drop a past video or its settings JSON: the form gets its settings back
    restore_note: gr.Markdown
    prompt: gr.Textbox
    prompt_rows: gr.Dataframe  # the timeline editor: (time, prompt) rows kept in step with the prompt's syntax
    prompt_blend: gr.Slider
    negative: gr.Textbox
    seconds: gr.Slider
    length: gr.Markdown
    timeline: gr.HTML  # where sections and prompt changes fall (present.timeline_html)
    seed: gr.Number
    randomise: gr.Button
    steps: gr.Slider
    gs: gr.Slider
    cfg: gr.Slider
    rs: gr.Slider
    teacache: gr.Checkbox
    teacache_threshold: gr.Slider
    resolution: gr.Slider
    crf: gr.Slider
    sampler: gr.Radio
    profile: gr.Dropdown
    storage: gr.Dropdown  # the transformer's storage: present.STORAGE_CHOICES
    plan: gr.Markdown
    generate: gr.Button
    stop: gr.Button
    progress: gr.Markdown
    preview: gr.Image
    section_video: gr.Video
    final_video: gr.Video
    gauges: gr.HTML  # present.gauges_html
    jobs: gr.HTML  # present.jobs_html; its Stop/Remove buttons send a click with {job, act}
    timer: gr.Timer
    job_id: gr.State  # the job this page follows (and Stop stops)
    last_gauges: gr.State  # the previous reading, for the disk read rate
    gallery: gr.Radio  # past outputs, newest first; the value is the video's file name
    gallery_refresh: gr.Button
    gallery_video: gr.Video
    gallery_settings: gr.Markdown
    use_settings: gr.Button
    gallery_seen: gr.State  # the outputs folder listing last shown, to refresh only on change
    lora_pickers: list  # gr.Dropdown per LoRA slot: a file of models/loras/ ("" for none)
    lora_strengths: list  # gr.Number per LoRA slot
    lora_refresh: gr.Button  # lists the LoRA folder again
    resume: gr.Button  # continue the selected interrupted or stopped output in place
    branch_section: gr.Number  # K: the first section a branch makes anew (1-based)
    branch: gr.Button  # the selected output's sections before K kept, the rest made with the form's settings
    extend_seconds: gr.Number
    extend_image: gr.Image  # the start image the extension is anchored to (empty: the video's own)
    extend: gr.Button
    extend_video: gr.File  # a video from elsewhere to extend instead of the selected output
    remove: gr.Button  # delete the selected output with its settings and section state
    # the jobs queued before the app restarted (they wait for the user): queue them all, or drop them all
    start_waiting: gr.Button | None = None
    drop_waiting: gr.Button | None = None
    models_files: gr.Markdown | None = None  # the missing files and their folders, folded away under the card
    notify_sound: gr.Checkbox | None = None  # a sound when a job ends
    job_end: gr.HTML | None = None  # its script tells the user a job ended: notification, title, sound
    # ids of the jobs this browser submitted, kept across reloads; encrypted with a key made at each start, so an
    # app restarted (its job numbers start again at 1) never reads an old list
    my_jobs: gr.BrowserState | None = None
    # the step cache (present.CACHE_KEYS, then the calibration checkbox); the teacache checkbox above follows it
    cache: gr.Radio | None = None
    magcache_threshold: gr.Slider | None = None
    magcache_max_skip_steps: gr.Slider | None = None
    magcache_retention_ratio: gr.Slider | None = None
    cache_calibrate: gr.Checkbox | None = None

    def cache_inputs(self) -> list:
        """The inputs of present.with_cache after the spec, in its order."""
        return [self.cache, self.magcache_threshold, self.magcache_max_skip_steps, self.magcache_retention_ratio,
                self.cache_calibrate]
    estimate: gr.Markdown | None = None  # the expected time before Generate (present.estimate_text)
    job_plot: gr.HTML | None = None  # the followed job's gauges and phases over time (present.job_plot_html)
    plot_seen: gr.State | None = None  # what job_plot shows now, to redraw only on change
    gallery_plot: gr.HTML | None = None  # the selected past output's timeline, from its settings file
    batch_images: gr.File | None = None  # several start images: a job for each image x each batch prompt
    batch_prompts: gr.Textbox | None = None  # one prompt a line
    batch_generate: gr.Button | None = None

    def spec_inputs(self) -> list:
        """The inputs of present.spec_from_inputs, in its order."""
        return [self.image, self.prompt, self.negative, self.seconds, self.seed, self.steps, self.gs, self.cfg,
                self.rs, self.teacache, self.teacache_threshold, self.resolution, self.crf, self.sampler,
                self.prompt_blend]

    def form_outputs(self) -> list:
        """What settings from a past job fill ("Use these settings", a dropped file): the start image, then
        present.FORM_KEYS and present.RESTORED_EXTRAS in order."""
        return [self.image, self.prompt, self.negative, self.seconds, self.seed, self.steps, self.gs, self.cfg,
                self.rs, self.teacache, self.teacache_threshold, self.resolution, self.crf, self.sampler,
                self.prompt_blend, self.profile, self.storage, self.prompt_rows, *self.cache_inputs()[:-1]]

    def lora_inputs(self) -> list:
        """Every LoRA slot's file, then every slot's strength (present.lora_choices' order)."""
        return [*self.lora_pickers, *self.lora_strengths]

    def job_outputs(self) -> list:
        """What following a job updates: the job id, then present.OUTPUTS in order."""
        return [self.job_id, self.preview, self.section_video, self.progress, self.final_video]


def build_page(models_notice: str = "", profiles: tuple[str, ...] = ("auto",), profile: str = "auto",
               lora_files: list[str] = (), loras_dir: str = "models/loras", models_files: str = "",
               offline: bool = False) -> Page:
    """Create the components inside the current gr.Blocks context. `models_notice`: the missing-models banner
    text ("" when none is missing); `profiles`: the memory profiles (worker.plan_choices()), `profile` selected;
    `lora_files`: the LoRA files in `loras_dir` (worker.lora_files()); `models_files`: the missing files, folded
    away under the banner (present.missing_files_text); `offline`: no Download button, the list open instead."""
    d = JobSpec(image="", prompt="")
    with gr.Column(visible=bool(models_notice), elem_id="models_banner") as banner:
        notice = gr.Markdown(models_notice, elem_id="models_notice")
        with gr.Row():
            download = gr.Button("Download models", variant="primary", elem_id="download_models", size="sm",
                                 visible=not offline)
            # shown only while a download runs (wiring)
            download_cancel = gr.Button("Cancel download", variant="stop", elem_id="download_cancel", size="sm",
                                        visible=False)
        with gr.Accordion("Files, and where to copy them by hand", open=offline, elem_id="models_files_box"):
            files = gr.Markdown(models_files, elem_id="models_files")
    download_progress = gr.HTML("", elem_id="download_progress", js_on_load=None)  # stays to say it ended
    with gr.Row():
        with gr.Column(scale=1):
            image = gr.Image(type="filepath", sources=["upload", "clipboard"], label="Start image",
                             elem_id="start_image", height=320)
            settings_file = gr.File(label="Settings from a file: drop a past video (.mp4) or its settings (.json)",
                                    file_types=[".mp4", ".json"], type="filepath", elem_id="settings_file",
                                    height=90)
            restore_note = gr.Markdown("", elem_id="restore_note")
            prompt = gr.Textbox(label="Prompt (prompts over time: [0s: a woman waves] [2.4s: she smiles])", lines=2,
                                placeholder="The girl dances gracefully, with clear movements, full of charm.",
                                elem_id="prompt")
            with gr.Accordion("Prompts over time", open=True):
                prompt_rows = gr.Dataframe(value=present.prompt_rows(""), headers=present.PROMPT_COLUMNS,
                                           datatype=["str", "str"], column_count=2,
                                           type="array", interactive=True, elem_id="prompt_rows",
                                           label="Each change lands at the nearest section boundary (every 1.2 s)")
                prompt_blend = gr.Slider(0, MAX_BLEND_SECTIONS, value=d.prompt_blend_sections, step=1,
                                         label="Blend each change over N sections (0: switch at the boundary)",
                                         elem_id="prompt_blend")
            negative = gr.Textbox(label="Negative prompt (used only when CFG > 1)", value=d.negative,
                                  elem_id="negative")
            with gr.Accordion("Batch: several images and/or prompts, the same settings", open=False):
                batch_images = gr.File(label="Start images (empty: the one above)", file_count="multiple",
                                       file_types=["image"], type="filepath", elem_id="batch_images", height=90)
                batch_prompts = gr.Textbox(label="Prompts, one a line (empty: the prompt above)", lines=3,
                                           elem_id="batch_prompts")
                batch_generate = gr.Button("Queue a job for each image x each prompt", elem_id="batch_generate",
                                           size="sm")
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", elem_id="generate")
                stop = gr.Button("Stop", variant="stop", elem_id="stop")
            estimate = gr.Markdown("**Estimate:** reading this machine's past jobs...", elem_id="estimate")
            seconds = gr.Slider(0.1, 120, value=d.seconds, step=0.1, label="Length (seconds)", elem_id="seconds")
            length = gr.Markdown(present.length_text(d.seconds), elem_id="length")
            timeline = gr.HTML(present.timeline_html("", d.seconds), elem_id="timeline")
            with gr.Row():
                seed = gr.Number(value=d.seed, precision=0, minimum=-1, maximum=SEED_MAX,
                                 label="Seed (-1 = random)", elem_id="seed", scale=3)
                randomise = gr.Button("Random seed", elem_id="randomise", size="sm", scale=1)
            with gr.Accordion("Settings", open=True):
                steps = gr.Slider(1, 100, value=d.steps, step=1, label="Steps", elem_id="steps")
                gs = gr.Slider(0, 32, value=d.gs, step=0.1, label="Distilled CFG (gs)", elem_id="gs")
                cfg = gr.Slider(1, 32, value=d.cfg, step=0.1, label="CFG (1 = off; above 1 doubles the time)",
                                elem_id="cfg")
                rs = gr.Slider(0, 1, value=d.rs, step=0.01, label="CFG rescale (only with CFG > 1)", elem_id="rs")
                cache, magcache_settings = _step_cache_controls(d)
                with gr.Row():
                    teacache = gr.Checkbox(value=d.teacache, label="TeaCache (faster, hands a bit worse)",
                                           elem_id="teacache", visible=False)  # follows `cache` (older settings)
                    threshold = gr.Slider(0, 1, value=d.teacache_threshold, step=0.01, label="TeaCache threshold",
                                          elem_id="teacache_threshold")
                resolution = gr.Slider(64, 1280, value=d.resolution, step=16,
                                       label="Resolution (area of about N x N pixels)", elem_id="resolution")
                crf = gr.Slider(1, 51, value=d.crf, step=1, label="MP4 quality (CRF: lower is better, bigger)",
                                elem_id="crf")
                sampler = gr.Radio(list(SAMPLERS), value=d.sampler, label="Sampler", elem_id="sampler")
            with gr.Accordion("LoRA", open=bool(lora_files)):
                gr.Markdown(f"LoRA files for the video model (kohya / musubi-tuner or diffusers .safetensors) in "
                            f"`{loras_dir}`, each at its strength (1: as trained, 0: off).", elem_id="lora_help")
                lora_pickers, lora_strengths = [], []
                for slot in range(present.LORA_SLOTS):
                    with gr.Row():
                        lora_pickers.append(gr.Dropdown([present.NO_LORA, *lora_files], value=present.NO_LORA[1],
                                                        label=f"LoRA {slot + 1}", elem_id=f"lora_file_{slot}",
                                                        scale=3))
                        lora_strengths.append(gr.Number(1.0, minimum=-10, maximum=10, step=0.05, label="Strength",
                                                        elem_id=f"lora_strength_{slot}", scale=1))
                lora_refresh = gr.Button("List the LoRA folder again", size="sm", elem_id="lora_refresh")
            with gr.Accordion("Memory", open=True):
                profile = gr.Dropdown(list(profiles), value=profile if profile in profiles else profiles[0], label="Memory profile (auto: planned for "
                                      "this machine; the others force where the big models live)",
                                      elem_id="memory_profile")
                storage = gr.Dropdown(present.STORAGE_CHOICES, value=present.STORAGE_CHOICES[0][1],
                                      label="Video model storage (automatic: fp8 where bf16 would be read from disk "
                                            "every step; fp8 is converted once, about 13 GB)",
                                      elem_id="transformer_storage")
                plan = gr.Markdown("Reading the machine...", elem_id="plan")
        with gr.Column(scale=1):
            progress = gr.Markdown(present.progress_text(present.JobView()), elem_id="progress")
            preview = gr.Image(label="Latest preview (the section being sampled)", type="numpy",
                               interactive=False, elem_id="preview", height=160)
            section_video = gr.Video(label="Video so far (grows by a section at a time)", autoplay=True,
                                     loop=True, interactive=False, elem_id="section_video", height=360)
            final_video = gr.Video(label="Final video", interactive=False, elem_id="final_video", height=360)
            gauges = gr.HTML("Reading the gauges...", elem_id="gauges", js_on_load=None)
            job_plot = gr.HTML("", elem_id="job_plot")
            with gr.Accordion("Jobs", open=True):
                jobs = gr.HTML(present.jobs_html([]), elem_id="jobs", js_on_load=JOBS_JS)
                with gr.Row():
                    start_waiting = gr.Button("Start waiting jobs", size="sm", elem_id="start_waiting")
                    drop_waiting = gr.Button("Drop waiting jobs", size="sm", elem_id="drop_waiting")
                notify_sound = gr.Checkbox(False, label="Play a sound when a job ends", elem_id="notify_sound")
                job_end = gr.HTML("", elem_id="job_end", js_on_load=JOB_END_JS)
    with gr.Accordion("Past outputs", open=True):
        with gr.Row():
            with gr.Column(scale=1):
                gallery = gr.Radio([], value=None, label="Videos in the outputs folder, newest first",
                                   elem_id="gallery")
                gallery_refresh = gr.Button("Refresh", size="sm", elem_id="gallery_refresh")
            with gr.Column(scale=1):
                gallery_video = gr.Video(label="Past output", interactive=False, elem_id="gallery_video",
                                         height=300)
                gallery_settings = gr.Markdown(present.gallery_details(None), elem_id="gallery_settings")
                gallery_plot = gr.HTML("", elem_id="gallery_plot")
                use_settings = gr.Button("Use these settings", elem_id="use_settings")
                resume = gr.Button("Resume (continue to its planned length, in the same file)", elem_id="resume")
                with gr.Row():
                    branch_section = gr.Number(value=2, precision=0, minimum=1, label="Branch from section K",
                                               elem_id="branch_section", scale=1)
                    branch = gr.Button("Branch from section K (the form's prompt, seed and settings)",
                                       elem_id="branch", scale=2)
                with gr.Row():
                    extend_seconds = gr.Number(value=2.4, minimum=0.1, label="Extend by seconds",
                                               elem_id="extend_seconds", scale=1)
                    extend = gr.Button("Extend (the form's prompt and settings)", elem_id="extend", scale=2)
                extend_image = gr.Image(type="filepath", sources=["upload", "clipboard"], height=160,
                                        label=present.EXTEND_IMAGE_LABEL, elem_id="extend_image")
                extend_video = gr.File(label="...or extend a video from elsewhere (instead of the selected output)",
                                       file_types=["video"], type="filepath", elem_id="extend_video", height=80)
                remove = gr.Button("Delete this output", variant="stop", size="sm", elem_id="remove_output")
    return Page(banner, notice, download, download_cancel, download_progress, image, settings_file, restore_note,
                prompt, prompt_rows, prompt_blend, negative, seconds, length, timeline, seed, randomise, steps, gs,
                cfg, rs, teacache, threshold, resolution, crf, sampler, profile, storage, plan, generate, stop,
                progress, preview, section_video, final_video, gauges, jobs, gr.Timer(1.0),
                gr.State(None), gr.State(None), gallery, gallery_refresh, gallery_video, gallery_settings,
                use_settings, gr.State(None), lora_pickers, lora_strengths, lora_refresh, resume, branch_section,
                branch, extend_seconds, extend_image, extend, extend_video, remove,
                start_waiting=start_waiting, drop_waiting=drop_waiting, models_files=files,
                notify_sound=notify_sound, job_end=job_end, my_jobs=gr.BrowserState([], storage_key="framepack_jobs"),
                cache=cache, **magcache_settings, estimate=estimate, job_plot=job_plot, plot_seen=gr.State(None),
                gallery_plot=gallery_plot, batch_images=batch_images, batch_prompts=batch_prompts,
                batch_generate=batch_generate)


def _step_cache_controls(d: JobSpec) -> tuple:
    """The step cache's choice and MagCache's settings (spec.JobSpec's fields, its defaults)."""
    cache = gr.Radio(list(CACHE_METHODS), value=d.cache_method, elem_id="cache",
                     label="Step cache: skip model calls predictable from the last one (teacache: the official "
                           "demo's; magcache: faster, opt-in until checked on the real weights)")
    with gr.Row():
        threshold = gr.Slider(0, 1, value=d.magcache_threshold, step=0.005, label="MagCache threshold",
                              elem_id="magcache_threshold")
        max_skip = gr.Slider(0, MAGCACHE_MAX_SKIP_LIMIT, value=d.magcache_max_skip_steps, step=1,
                             label="MagCache: at most K steps skipped in a row", elem_id="magcache_max_skip_steps")
        retention = gr.Slider(0, 1, value=d.magcache_retention_ratio, step=0.01,
                              label="MagCache: first fraction of steps always computed",
                              elem_id="magcache_retention_ratio")
    calibrate = gr.Checkbox(value=False, elem_id="cache_calibrate",
                            label="Calibrate MagCache with this job (one run without skipping; later MagCache jobs "
                                  "with this model, steps, resolution, storage and LoRAs use its ratios)")
    return cache, dict(magcache_threshold=threshold, magcache_max_skip_steps=max_skip,
                       magcache_retention_ratio=retention, cache_calibrate=calibrate)
