"""The page's components, laid out; no events here (see wiring.py)."""
from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from ..spec import SAMPLERS, SEED_MAX, JobSpec
from . import present

CSS = """
#gauges, #progress { font-variant-numeric: tabular-nums; }
#preview img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
"""


@dataclass
class Page:
    """Every component the wiring needs, by name."""
    models_notice: gr.Markdown
    image: gr.Image
    prompt: gr.Textbox
    negative: gr.Textbox
    seconds: gr.Slider
    length: gr.Markdown
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
    generate: gr.Button
    stop: gr.Button
    progress: gr.Markdown
    preview: gr.Image
    section_video: gr.Video
    final_video: gr.Video
    gauges: gr.Markdown
    jobs: gr.Markdown
    timer: gr.Timer
    job_id: gr.State  # the job this page follows (and Stop stops)
    last_gauges: gr.State  # the previous reading, for the disk read rate

    def spec_inputs(self) -> list:
        """The inputs of present.spec_from_inputs, in its order."""
        return [self.image, self.prompt, self.negative, self.seconds, self.seed, self.steps, self.gs, self.cfg,
                self.rs, self.teacache, self.teacache_threshold, self.resolution, self.crf, self.sampler]

    def job_outputs(self) -> list:
        """What following a job updates: the job id, then present.OUTPUTS in order."""
        return [self.job_id, self.preview, self.section_video, self.progress, self.final_video]


def build_page(models_notice: str = "") -> Page:
    """Create the components inside the current gr.Blocks context."""
    d = JobSpec(image="", prompt="")
    notice = gr.Markdown(notice_text(models_notice), visible=bool(models_notice), elem_id="models_notice")
    with gr.Row():
        with gr.Column(scale=1):
            image = gr.Image(type="filepath", sources=["upload", "clipboard"], label="Start image",
                             elem_id="start_image", height=320)
            prompt = gr.Textbox(label="Prompt", lines=2, placeholder="The girl dances gracefully, with clear "
                                "movements, full of charm.", elem_id="prompt")
            negative = gr.Textbox(label="Negative prompt (used only when CFG > 1)", value=d.negative,
                                  elem_id="negative")
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", elem_id="generate")
                stop = gr.Button("Stop", variant="stop", elem_id="stop")
            seconds = gr.Slider(0.1, 120, value=d.seconds, step=0.1, label="Length (seconds)", elem_id="seconds")
            length = gr.Markdown(present.length_text(d.seconds), elem_id="length")
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
                with gr.Row():
                    teacache = gr.Checkbox(value=d.teacache, label="TeaCache (faster, hands a bit worse)",
                                           elem_id="teacache")
                    threshold = gr.Slider(0, 1, value=d.teacache_threshold, step=0.01, label="TeaCache threshold",
                                          elem_id="teacache_threshold")
                resolution = gr.Slider(128, 1280, value=d.resolution, step=16,
                                       label="Resolution (area of about N x N pixels)", elem_id="resolution")
                crf = gr.Slider(1, 51, value=d.crf, step=1, label="MP4 quality (CRF: lower is better, bigger)",
                                elem_id="crf")
                sampler = gr.Radio(list(SAMPLERS), value=d.sampler, label="Sampler", elem_id="sampler")
        with gr.Column(scale=1):
            progress = gr.Markdown(present.progress_text(present.JobView()), elem_id="progress")
            preview = gr.Image(label="Latest preview (the section being sampled)", type="numpy",
                               interactive=False, elem_id="preview", height=160)
            section_video = gr.Video(label="Video so far (grows by a section at a time)", autoplay=True,
                                     loop=True, interactive=False, elem_id="section_video", height=360)
            final_video = gr.Video(label="Final video", interactive=False, elem_id="final_video", height=360)
            gauges = gr.Markdown("Reading the gauges...", elem_id="gauges")
            with gr.Accordion("Jobs", open=True):
                jobs = gr.Markdown("No jobs yet.", elem_id="jobs")
    return Page(notice, image, prompt, negative, seconds, length, seed, randomise, steps, gs, cfg, rs, teacache,
                threshold, resolution, crf, sampler, generate, stop, progress, preview, section_video,
                final_video, gauges, jobs, gr.Timer(1.0), gr.State(None), gr.State(None))


def notice_text(missing: str) -> str:
    # A download button comes later; until then the one line says which files go where.
    return f"**Model files are missing.** {missing}" if missing else ""
