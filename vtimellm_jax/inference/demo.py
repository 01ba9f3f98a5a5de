"""`vtimellm-jax demo`: a web page to chat with a model about a video, every moment clickable.

The page (gradio, imported only here) has a video player with upload, the videos given with
`--example` as examples (by default the release's demo video, from a checkout), a multi-turn chat
about the current video, a temperature slider and a button that clears the conversation; another
video starts a new conversation. Every moment of an answer (moments.py) is shown in seconds as a
chip that seeks the player to its start, and a timeline under the player draws each moment of the
conversation as a bar over the video's length.

A video is sampled and encoded once (`served.VideoCache`); every question about it reuses its
features. The page binds 127.0.0.1 unless told otherwise and reaches nothing outside the machine:
gradio's analytics are off, there is no share link, and the theme names only local fonts.

The chat is rendered as our own HTML with gradio's markdown and sanitiser off: the sanitiser drops
the chips' data attributes, and markdown would turn a model's text into links. So every text from the
model or the user is HTML-escaped here (`render_answer`, `render_question`) before it reaches the page.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import os
import pathlib
from collections.abc import Sequence

from vtimellm_jax.errors import UserError
from vtimellm_jax.inference import moments, prompts

PLAYER_ID = "vtimellm-player"
CHAT_ID = "vtimellm-chat"
TIMELINE_ID = "vtimellm-timeline"
CHIP_CLASS = "moment-chip"
BAR_CLASS = "moment-bar"
# The release's demo video, in a checkout of this repository (a test fixture with its licence note,
# tests/fixtures/README.md). It is CC BY-NC-ND, so the package does not ship it; an installed wheel
# has no default example.
CHECKOUT_DEMO_VIDEO = (pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "vtimellm_official"
                       / "demo.mp4")
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
INSTALL_HINT = "pip install 'vtimellm-jax[demo]'"
MIN_BAR_PERCENT = 0.6  # a moment "from 40 to 40" still gets a bar one can see and click

# One listener on the document: the chat and the timeline are re-rendered after every answer, so
# listeners on the chips themselves would be lost. Seeking before the video's metadata has loaded is
# ignored by browsers, hence the wait for `loadedmetadata`.
SEEK_SCRIPT = f"""<script>
document.addEventListener("click", (event) => {{
  const chip = event.target instanceof Element ? event.target.closest(".{CHIP_CLASS}") : null;
  if (!chip) return;
  const start = parseFloat(chip.dataset.start);
  const video = document.querySelector("#{PLAYER_ID} video");
  if (!video || !Number.isFinite(start)) return;
  event.preventDefault();
  const seek = () => {{ video.currentTime = start; }};
  if (video.readyState >= 1) seek(); else video.addEventListener("loadedmetadata", seek, {{once: true}});
}});
</script>"""

CSS = f"""
.{CHIP_CLASS} {{ cursor: pointer; border: 1px solid #2563eb; border-radius: 999px; background: #dbeafe;
  color: #1e3a8a; padding: 0 0.55em; margin: 0 0.2em; font-size: 0.9em; line-height: 1.5; }}
.{CHIP_CLASS}:hover {{ background: #bfdbfe; }}
.vt-text {{ white-space: pre-wrap; }}
.vt-timeline {{ font-size: 0.85em; }}
.vt-row {{ display: flex; align-items: center; gap: 0.5em; margin: 3px 0; }}
.vt-row-label {{ width: 2.5em; text-align: right; color: #6b7280; }}
.vt-track {{ position: relative; flex: 1; height: 1.5em; background: #f3f4f6; border-radius: 4px; }}
.{CHIP_CLASS}.{BAR_CLASS} {{ position: absolute; top: 0; bottom: 0; margin: 0; padding: 0 0.2em;
  border-radius: 4px; overflow: hidden; white-space: nowrap; font-size: 0.8em; }}
.vt-axis {{ display: flex; justify-content: space-between; margin-left: 3em; color: #6b7280; }}
.vt-note {{ color: #6b7280; }}
"""


def _seconds_attr(seconds: float) -> str:
  """Returns seconds as a data attribute's value: milliseconds are finer than any frame."""
  return f"{seconds:.3f}"


def render_chip(start: float, end: float, extra_class: str = "", style: str = "", label: str | None = None) -> str:
  """Returns the HTML of a chip that seeks the player to `start` seconds (moment `start`-`end`)."""
  classes = f"{CHIP_CLASS} {extra_class}".strip()
  text = f"{start:.1f}s – {end:.1f}s" if label is None else label
  style_attr = f' style="{html.escape(style)}"' if style else ""
  return (f'<button type="button" class="{classes}" data-start="{_seconds_attr(start)}" '
          f'data-end="{_seconds_attr(end)}" title="{start:.1f}s – {end:.1f}s"{style_attr}>{html.escape(text)}</button>')


def render_question(text: str) -> str:
  """Returns a user's question as HTML, escaped."""
  return f'<div class="vt-text">{html.escape(text)}</div>'


def render_answer(text: str, duration: float | None) -> str:
  """Returns an answer as HTML: the text escaped, each moment followed by a chip of its seconds.

  Without a duration (no video) the moments cannot be placed in time and the text is shown alone.
  """
  found = moments.find_moments(text) if duration else []
  parts, last = [], 0
  for moment in found:
    start, end = moment.seconds(duration)
    parts += [html.escape(text[last:moment.span[1]]), " ", render_chip(start, end)]
    last = moment.span[1]
  parts.append(html.escape(text[last:]))
  return f'<div class="vt-text">{"".join(parts)}</div>'


def render_timeline(answers: Sequence[str], duration: float | None) -> str:
  """Returns the timeline's HTML: one row per answer that names moments, one bar per moment.

  A bar spans its moment over [0, duration]; as frame index i is i/100 of the video, its left edge
  and width in percent are the moment's indices.
  """
  if not duration:
    return f'<div class="vt-timeline"><span class="vt-note">{html.escape("Upload a video or pick an example.")}</span></div>'
  rows = []
  for number, answer in enumerate(answers, 1):
    bars = []
    for moment in moments.find_moments(answer):
      start, end = moment.seconds(duration)
      left, right = sorted((moment.start, moment.end))
      style = f"left: {left}%; width: {max(right - left, MIN_BAR_PERCENT)}%;"
      bars.append(render_chip(start, end, BAR_CLASS, style))
    if bars:
      rows.append(f'<div class="vt-row"><span class="vt-row-label">A{number}</span>'
                  f'<div class="vt-track">{"".join(bars)}</div></div>')
  if not rows:
    rows.append('<div class="vt-note">The moments of the answers will appear here, one bar each.</div>')
  axis = f'<div class="vt-axis"><span>0.0s</span><span>{duration:.1f}s</span></div>'
  return (f'<div class="vt-timeline" data-duration="{_seconds_attr(duration)}">'
          f'{"".join(rows)}{axis}</div>')


@dataclasses.dataclass(frozen=True)
class Conversation:
  """One page's state: the current video, its length, and the (question as typed, answer) rounds."""

  video: str | None = None
  duration: float | None = None
  rounds: tuple[tuple[str, str], ...] = ()

  def history(self) -> list[tuple[str, str]]:
    """Returns the rounds as the prompt takes them: the first question holds `<video>`."""
    return [(prompts.chat_question(q) if i == 0 else q, a) for i, (q, a) in enumerate(self.rounds)]

  def messages(self) -> list[dict[str, str]]:
    """Returns the chat's messages (gradio's role/content dicts), rendered as HTML."""
    out = []
    for question, answer in self.rounds:
      out += [{"role": "user", "content": render_question(question)},
              {"role": "assistant", "content": render_answer(answer, self.duration)}]
    return out

  def timeline(self) -> str:
    """Returns the timeline's HTML of every answer so far."""
    return render_timeline([a for _, a in self.rounds], self.duration)


class Demo:
  """What the page does, without the page: opens videos and answers questions about them."""

  def __init__(self, bot, videos, max_new_tokens: int, seed: int = 0):
    """`bot` an answerer.Answerer; `videos` a served.VideoCache (path -> (features, duration))."""
    self.bot = bot
    self.videos = videos
    self.max_new_tokens = max_new_tokens
    self.seed = seed

  def open_video(self, path: str | os.PathLike | None) -> Conversation:
    """Returns a new conversation about a video (encoded now, once), or an empty one for None."""
    if not path:
      return Conversation()
    _, duration = self.videos(path)
    return Conversation(str(path), duration)

  def ask(self, conversation: Conversation, question: str, temperature: float) -> Conversation:
    """Returns the conversation with `question` asked and answered."""
    import jax  # pylint: disable=g-import-not-at-top

    from vtimellm_jax.inference import generate  # pylint: disable=g-import-not-at-top

    question = question.strip()
    if conversation.video is None:
      raise UserError("upload a video first (or pick an example)")
    if not question:
      raise UserError("type a question")
    features, _ = self.videos(conversation.video)
    config = generate.GenerationConfig(max_new_tokens=self.max_new_tokens, temperature=float(temperature))
    history = conversation.history()
    asked = prompts.chat_question(question) if not history else question
    # As `chat` does: round r of a conversation samples with the seed's key folded with r.
    key = jax.random.fold_in(jax.random.key(self.seed), len(history))[None]
    answer, = self.bot.answer([(history, asked)], [features], config, key)
    return dataclasses.replace(conversation, rounds=conversation.rounds + ((question, answer.text),))


def import_gradio():
  """Returns the gradio module, analytics off; UserError naming the extra if it is not installed."""
  # Read when gradio is imported and when a Blocks is made: no usage reports, no version checks.
  os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
  try:
    import gradio  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError(f"the demo needs gradio: {INSTALL_HINT}") from None
  return gradio


def default_examples() -> list[pathlib.Path]:
  """Returns the examples when none are given: the release's demo video where the checkout has it."""
  return [CHECKOUT_DEMO_VIDEO] if CHECKOUT_DEMO_VIDEO.is_file() else []


def check_examples(paths: Sequence[str | os.PathLike]) -> list[pathlib.Path]:
  """Returns the example videos as absolute paths; UserError naming one that is not a file."""
  out = []
  for path in paths:
    resolved = pathlib.Path(path).expanduser().resolve()
    if not resolved.is_file():
      raise UserError(f"--example {path}: no such video file")
    out.append(resolved)
  return out


def build_app(demo: Demo, examples: Sequence[pathlib.Path] = ()):
  """Returns the page (a gradio Blocks) driving `demo`, `examples` (video files) listed under the player."""
  from vtimellm_jax.inference import generate  # pylint: disable=g-import-not-at-top

  gr = import_gradio()

  def user_errors(fn):
    # A UserError becomes gradio's error toast, its message and nothing else.
    @functools.wraps(fn)
    def wrapped(*args):
      try:
        return fn(*args)
      except UserError as e:
        raise gr.Error(str(e)) from None
    return wrapped

  @user_errors
  def on_video(path):
    conversation = demo.open_video(path)
    return conversation.messages(), conversation.timeline(), conversation

  @user_errors
  def on_ask(path, question, temperature, conversation):
    if path and path != conversation.video:  # the video changed and its event has not run yet
      conversation = demo.open_video(path)
    conversation = demo.ask(conversation, question or "", temperature)
    return conversation.messages(), conversation.timeline(), conversation, ""

  def on_clear(conversation):
    conversation = dataclasses.replace(conversation, rounds=())
    return conversation.messages(), conversation.timeline(), conversation

  with gr.Blocks(title="VTimeLLM demo", analytics_enabled=False) as app:
    state = gr.State(Conversation())
    gr.Markdown("## VTimeLLM\nAsk when something happens in the video; click a moment to jump to it.")
    with gr.Row():
      with gr.Column(scale=1):
        video = gr.Video(label="Video", sources=["upload"], elem_id=PLAYER_ID, include_audio=True, height=360)
        timeline = gr.HTML(render_timeline([], None), elem_id=TIMELINE_ID, js_on_load=None)
        if examples:
          gr.Examples([[str(path)] for path in examples], inputs=[video], label="Example videos")
      with gr.Column(scale=1):
        chat = gr.Chatbot(label="Conversation", elem_id=CHAT_ID, height=460, sanitize_html=False,
                          render_markdown=False, latex_delimiters=[], feedback_options=None, buttons=[])
        question = gr.Textbox(label="Question", placeholder="During which frames can we see ...?",
                              elem_id="vtimellm-question", lines=1, max_lines=4)
        with gr.Row():
          ask = gr.Button("Ask", variant="primary", elem_id="vtimellm-ask")
          clear = gr.Button("Clear conversation", elem_id="vtimellm-clear")
        temperature = gr.Slider(0, 1, value=generate.RELEASE_TEMPERATURE, step=0.01, label="Temperature",
                                info="0 is greedy; the release samples with 0.05")
    # One model, one request at a time: encoding a video and answering share the queue.
    shared = {"concurrency_id": "model", "concurrency_limit": 1}
    video.change(on_video, [video], [chat, timeline, state], **shared)
    for trigger in (ask.click, question.submit):
      trigger(on_ask, [video, question, temperature, state], [chat, timeline, state, question], **shared)
    # The chat's own trash button empties the chat on the page; the conversation must follow.
    for trigger in (clear.click, chat.clear):
      trigger(on_clear, [state], [chat, timeline, state])
  return app


def launch(app, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, block: bool = True,
           examples: Sequence[pathlib.Path] = ()) -> str:
  """Serves the page on host:port; returns its URL (at once with block=False, else when stopped).

  Gradio serves files only from the folders it is told; those are the example videos' own.
  """
  gr = import_gradio()
  theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                            font_mono=["ui-monospace", "monospace"])
  try:
    _, url, _ = app.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block,
                           head=SEEK_SCRIPT, css=CSS, theme=theme, allowed_paths=sorted({str(path.parent) for path in examples}),
                           ssr_mode=False, enable_monitoring=False, mcp_server=False, pwa=False,
                           footer_links=[], quiet=not block)
  except OSError as e:
    raise UserError(f"cannot serve the demo on {host}:{port}: {e}") from None
  return url


def serve(model: str, clip: str | None = None, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          dtype: str = "auto", max_new_tokens: int | None = None,
          examples: Sequence[str | os.PathLike] = ()) -> None:
  """Loads `--model` (a model directory or a quickstart workdir) and serves the demo until stopped."""
  from vtimellm_jax.inference import answerer, generate, served  # pylint: disable=g-import-not-at-top

  import_gradio()  # before minutes of loading, fail on a missing gradio or example
  example_paths = check_examples(examples) if examples else default_examples()
  served_model = served.resolve(model, clip)
  if served_model.clip is None:
    raise UserError("the demo encodes the videos it is given: pass --clip (a CLIP model directory) with a "
                    "model directory; a quickstart workdir names its own")
  videos = served.VideoCache(served_model, dtype)
  bot = answerer.load_answerer(served_model.model_dir, dtype)
  demo = Demo(bot, videos, max_new_tokens or generate.RELEASE_MAX_NEW_TOKENS)
  launch(build_app(demo, example_paths), host, port, block=True, examples=example_paths)
