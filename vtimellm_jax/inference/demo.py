"""`vtimellm-jax demo`: a web page to chat with a model about a video, every moment clickable.

The page (gradio, imported only here) has a video player with upload, the example videos the
command was given, a multi-turn chat about the current video, a temperature slider (0 to 2, as the
release's demo) and a button that clears the conversation; another video starts a new conversation.
A question shows in the chat at once and its answer streams in as the model decodes it. Every moment
of an answer (moments.py) is shown in seconds as a chip that plays the moment, from its start to its
end; a timeline under the player draws each moment of the conversation as a bar over the video's
length, with time ticks and a playhead that follows the player.

Answers come from the server's path (`server.ChatService` on a one-slot `batching.Engine`): the same
prompts, keys, token budget and streamed text deltas as `serve`, so a conversation on the page gets
`chat`'s answers. A video is sampled and encoded once (`served.VideoCache`); every question about it
reuses its features.

A mistake (no video, an empty question, a file that is not a video, a conversation too long for the
model) is a warning on the page and one line in the terminal; the chat, the timeline and the
question box stay as they were. A warning names an uploaded file by its own name, never gradio's
temporary path, and says what is wrong in plain words; the terminal line keeps the reader's details.

The page binds 127.0.0.1 unless told otherwise and reaches nothing outside the machine: gradio's
analytics are off, there is no share link, and the theme names only local fonts. It serves no file
of the machine but the uploads and gradio's own copies of the example videos (made when the page is
built), so an example's folder stays private.

The chat is rendered as our own HTML with gradio's markdown and sanitiser off: the sanitiser drops
the chips' data attributes, and markdown would turn a model's text into links. So every text from the
model or the user is HTML-escaped here (`render_answer`, `render_question`) before it reaches the page.
"""

from __future__ import annotations

import dataclasses
import html
import logging
import math
import os
import pathlib
import queue
import sys
import time
from collections.abc import Iterator, Sequence

from vtimellm_jax.errors import UserError
from vtimellm_jax.inference import moments, prompts

PLAYER_ID = "vtimellm-player"
CHAT_ID = "vtimellm-chat"
TIMELINE_ID = "vtimellm-timeline"
QUESTION_ID = "vtimellm-question"
CHIP_CLASS = "moment-chip"
BAR_CLASS = "moment-bar"
PENDING_CLASS = "vt-pending"  # the bubble of an answer still being decoded
PLAYHEAD_CLASS = "vt-playhead"
TICK_CLASS = "vt-tick"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
INSTALL_HINT = "pip install 'vtimellm-jax[demo]'"
MIN_BAR_PERCENT = 0.6  # a moment "from 40 to 40" still gets a bar one can see and click
SHORT_BAR_PERCENT = 12  # a narrower bar writes its seconds beside it, where they fit
TICK_STEPS_S = (0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600)
MAX_TICK_INTERVALS = 8

_log = logging.getLogger(__name__)

# One listener on the document: the chat and the timeline are re-rendered after every answer, so
# listeners on the chips themselves would be lost. Seeking before the video's metadata has loaded is
# ignored by browsers, hence the wait for `loadedmetadata`. A chip plays its moment and pauses at its
# end; a seek out of the moment (the user's own) lets playback go on. The check runs every animation
# frame, so the pause comes within a frame of the end (`timeupdate` comes four times a second; it
# is kept for a hidden tab, where frames stop), and the same frame moves the timeline's playhead.
PAGE_SCRIPT = f"""<script>
(() => {{
  const player = () => document.querySelector("#{PLAYER_ID} video");
  let moment = null;  // {{video, start, end}}: the clicked moment, playing until its end
  document.addEventListener("click", (event) => {{
    const chip = event.target instanceof Element ? event.target.closest(".{CHIP_CLASS}") : null;
    if (!chip) return;
    const start = parseFloat(chip.dataset.start), end = parseFloat(chip.dataset.end);
    const video = player();
    if (!video || !Number.isFinite(start)) return;
    event.preventDefault();
    const play = () => {{
      video.currentTime = start;
      moment = Number.isFinite(end) && end > start ? {{video, start, end}} : null;
      if (moment) video.play().catch(() => {{ moment = null; }});
    }};
    if (video.readyState >= 1) play(); else video.addEventListener("loadedmetadata", play, {{once: true}});
  }});
  document.addEventListener("seeking", (event) => {{
    const t = event.target.currentTime;
    if (moment && event.target === moment.video && (t < moment.start - 0.05 || t > moment.end)) moment = null;
  }}, true);
  const stopAtEnd = () => {{
    const video = player();
    if (moment && moment.video !== video) moment = null;
    if (moment && !video.paused && video.currentTime >= moment.end) {{
      const end = moment.end;
      moment = null;
      video.pause();
      video.currentTime = end;
    }}
  }};
  document.addEventListener("timeupdate", stopAtEnd, true);
  const frame = () => {{
    stopAtEnd();
    const video = player();
    const timeline = document.querySelector("#{TIMELINE_ID} [data-duration]");
    const head = timeline && timeline.querySelector(".{PLAYHEAD_CLASS}");
    const duration = timeline ? parseFloat(timeline.dataset.duration) : NaN;
    if (head && video && duration > 0) {{
      const left = Math.min(100, 100 * video.currentTime / duration) + "%";
      if (head.style.left !== left) head.style.left = left;
    }}
    requestAnimationFrame(frame);
  }};
  requestAnimationFrame(frame);
}})();
</script>"""

CSS = f"""
.{CHIP_CLASS} {{ cursor: pointer; border: 1px solid #2563eb; border-radius: 999px; background: #dbeafe;
  color: #1e3a8a; padding: 0 0.55em; margin: 0 0.2em; font-size: 0.9em; line-height: 1.5; }}
.{CHIP_CLASS}:hover {{ background: #bfdbfe; }}
.vt-text {{ white-space: pre-wrap; }}
.{PENDING_CLASS}::after {{ content: "▍"; color: #6b7280; }}
.vt-timeline {{ font-size: 0.85em; }}
.vt-lanes {{ position: relative; }}
.vt-row {{ display: flex; align-items: center; gap: 0.5em; margin: 3px 0; }}
.vt-row-label {{ width: 2.5em; text-align: right; color: #6b7280; }}
.vt-track {{ position: relative; flex: 1; height: 1.5em; background: #f3f4f6; border-radius: 4px; }}
.{CHIP_CLASS}.{BAR_CLASS} {{ position: absolute; top: 0; bottom: 0; margin: 0; padding: 0 0.2em;
  border-radius: 4px; overflow: hidden; white-space: nowrap; font-size: 0.8em; }}
.{CHIP_CLASS}.{BAR_CLASS}.vt-short {{ overflow: visible; padding: 0; }}
.vt-short .vt-chip-label {{ position: absolute; left: 100%; margin-left: 0.3em; top: 0.15em; }}
.vt-short.vt-label-before .vt-chip-label {{ left: auto; right: 100%; margin: 0 0.3em 0 0; }}
.vt-axis {{ position: relative; margin-left: 3em; height: 1.6em; border-top: 1px solid #d1d5db; color: #6b7280; }}
.{TICK_CLASS} {{ position: absolute; top: 0; transform: translateX(-50%); padding-top: 4px; font-size: 0.85em; }}
.{TICK_CLASS}::before {{ content: ""; position: absolute; top: 0; left: 50%; height: 4px; border-left: 1px solid #9ca3af; }}
.vt-playhead-lane {{ position: absolute; top: 0; bottom: 1.6em; left: 3em; right: 0; pointer-events: none; }}
.{PLAYHEAD_CLASS} {{ position: absolute; top: 0; bottom: 0; width: 2px; margin-left: -1px; background: #dc2626; }}
.vt-note {{ color: #6b7280; }}
"""


def _seconds_attr(seconds: float) -> str:
  """Returns seconds as a data attribute's value: milliseconds are finer than any frame."""
  return f"{seconds:.3f}"


def render_chip(start: float, end: float, extra_class: str = "", style: str = "", label: str | None = None) -> str:
  """Returns the HTML of a chip that plays the moment `start`-`end` seconds (seeks to `start`)."""
  classes = f"{CHIP_CLASS} {extra_class}".strip()
  text = f"{start:.1f}s – {end:.1f}s" if label is None else label
  style_attr = f' style="{html.escape(style)}"' if style else ""
  return (f'<button type="button" class="{classes}" data-start="{_seconds_attr(start)}" '
          f'data-end="{_seconds_attr(end)}" title="{start:.1f}s – {end:.1f}s"{style_attr}>'
          f'<span class="vt-chip-label">{html.escape(text)}</span></button>')


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


def render_pending(text: str) -> str:
  """Returns an answer still being decoded as HTML: its text so far, escaped, with no chips yet.

  A moment's numbers may still be growing ("from 10 to 2" before "25"), so chips wait for the end.
  """
  return f'<div class="vt-text {PENDING_CLASS}">{html.escape(text)}</div>'


def tick_seconds(duration: float) -> list[float]:
  """Returns the timeline's tick times: multiples of the smallest round step that makes at most
  MAX_TICK_INTERVALS intervals over [0, duration]."""
  step = next((s for s in TICK_STEPS_S if duration / s <= MAX_TICK_INTERVALS),
              3600 * math.ceil(duration / MAX_TICK_INTERVALS / 3600))
  return [i * step for i in range(int(duration // step) + 1)]


def clock(seconds: float, duration: float) -> str:
  """Returns a tick's label: "12s" (or "2.5s") in a video under a minute, else "m:ss" or "h:mm:ss"."""
  if duration < 60:
    return f"{seconds:g}s"
  minutes, secs = divmod(round(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def render_timeline(answers: Sequence[str], duration: float | None) -> str:
  """Returns the timeline's HTML: one row per answer that names moments, one bar per moment, the
  time ticks under them and a playhead (moved by the page's script).

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
      width = max(right - left, MIN_BAR_PERCENT)
      style = f"left: {left}%; width: {width}%;"
      short = "" if width >= SHORT_BAR_PERCENT else " vt-short" + (" vt-label-before" if left > 70 else "")
      label = None if not short else f"{start:.1f}s"  # the range is in the bar's tooltip
      bars.append(render_chip(start, end, BAR_CLASS + short, style, label))
    if bars:
      rows.append(f'<div class="vt-row"><span class="vt-row-label">A{number}</span>'
                  f'<div class="vt-track">{"".join(bars)}</div></div>')
  note = ""
  if not rows:  # an empty track still shows the ticks and the playhead
    rows.append('<div class="vt-row"><span class="vt-row-label"></span><div class="vt-track"></div></div>')
    note = '<div class="vt-note">The moments of the answers will appear here, one bar each.</div>'
  ticks = "".join(f'<span class="{TICK_CLASS}" style="left: {100 * t / duration:.3f}%;" data-seconds="{t:g}">'
                  f'{clock(t, duration)}</span>' for t in tick_seconds(duration))
  return (f'<div class="vt-timeline" data-duration="{_seconds_attr(duration)}"><div class="vt-lanes">'
          f'{"".join(rows)}<div class="vt-axis">{ticks}</div>'
          f'<div class="vt-playhead-lane"><div class="{PLAYHEAD_CLASS}" style="left: 0%;"></div></div>'
          f'</div>{note}</div>')


@dataclasses.dataclass(frozen=True)
class Conversation:
  """One page's state: the current video, its length, the (question as typed, answer) rounds, and
  the question being answered with its answer so far."""

  video: str | None = None
  duration: float | None = None
  rounds: tuple[tuple[str, str], ...] = ()
  pending: tuple[str, str] | None = None

  def history(self) -> list[tuple[str, str]]:
    """Returns the rounds as the prompt takes them: the first question holds `<video>`."""
    return [(prompts.chat_question(q) if i == 0 else q, a) for i, (q, a) in enumerate(self.rounds)]

  def messages(self) -> list[dict[str, str]]:
    """Returns the chat's messages (gradio's role/content dicts), rendered as HTML."""
    out = []
    for question, answer in self.rounds:
      out += [{"role": "user", "content": render_question(question)},
              {"role": "assistant", "content": render_answer(answer, self.duration)}]
    if self.pending is not None:
      question, answer = self.pending
      out += [{"role": "user", "content": render_question(question)},
              {"role": "assistant", "content": render_pending(answer)}]
    return out

  def timeline(self) -> str:
    """Returns the timeline's HTML of every answer so far."""
    return render_timeline([a for _, a in self.rounds], self.duration)


def _plain_video_error(path: str | os.PathLike) -> str:
  """Returns why a video file could not be opened, in the page's words: no path, no decoder's text."""
  from vtimellm_jax.video import decode  # pylint: disable=g-import-not-at-top

  if not os.path.isfile(path):
    return "the file is gone; upload it again"
  if pathlib.Path(path).suffix.lower() not in decode.VIDEO_EXTENSIONS:
    return f"not a video file (this page reads {', '.join(e[1:] for e in decode.VIDEO_EXTENSIONS)})"
  return "cannot be read as a video: the file is damaged, cut short, or in a format this page does not read"


class Demo:
  """What the page does, without the page: opens videos, takes questions and streams their answers."""

  def __init__(self, service, seed: int = 0):
    """`service` a server.ChatService (its engine answers; its `videos`, a served.VideoCache, encodes)."""
    self.service = service
    self.seed = seed

  def open_video(self, path: str | os.PathLike | None) -> Conversation:
    """Returns a new conversation about a video (encoded now, once), or an empty one for None.

    UserError names the file by its own name (an upload's path is gradio's temporary one) with a
    plain reason; the reader's message, for the terminal, is its cause.
    """
    if not path:
      return Conversation()
    _, duration = self._encoded(path)
    return Conversation(str(path), duration)

  def _encoded(self, path: str | os.PathLike):
    """Returns a video's (features, duration) from the cache, its errors in the page's words."""
    try:
      return self.service.videos(path)
    except UserError as e:
      raise UserError(f"{pathlib.Path(path).name}: {_plain_video_error(path)}") from e

  def pose(self, conversation: Conversation, question: str) -> Conversation:
    """Returns the conversation with `question` waiting for its answer; UserError if it cannot be asked."""
    question = question.strip()
    if conversation.video is None:
      raise UserError("upload a video first (or pick an example)")
    if not question:
      raise UserError("type a question")
    return dataclasses.replace(conversation, pending=(question, ""))

  def answer(self, conversation: Conversation, temperature: float) -> Iterator[Conversation]:
    """Yields the conversation as its pending question's answer is decoded; the last one holds the
    answered round and nothing pending.

    Round r of a conversation samples with the seed's key folded with r, as `chat` and `serve` do. A
    conversation too long for the model is a UserError, before any work. Closing the generator
    before its end (the page went away) frees the engine's slot.
    """
    from vtimellm_jax.inference import chat_request  # pylint: disable=g-import-not-at-top

    question, _ = conversation.pending
    features, _ = self._encoded(conversation.video)
    history = conversation.history()
    asked = question if history else prompts.chat_question(question)
    engine = self.service.engine
    # `submit` refuses it too, in the server's words (positions, max_tokens); the page says what to do.
    positions = engine.prompt_positions(engine.bot.prompt_ids(history, asked), features.shape[0])
    if positions >= engine.context:
      raise UserError(f"the conversation fills the model's {engine.context} positions: clear it to ask more")
    request = chat_request.ChatRequest(tuple(history), asked, conversation.video, conversation.duration,
                                       float(temperature), 1.0, None, self.seed)
    decoded: queue.Queue = queue.Queue()  # the engine thread's new ids, then None once the answer is done
    try:
      future, _, _ = self.service.submit(request, features, decoded.put)
    except chat_request.HTTPError as e:
      raise UserError(e.message) from None
    future.add_done_callback(lambda _: decoded.put(None))
    deltas, ids = self.service.text_deltas(), []
    try:
      while (new := decoded.get()) is not None:
        ids += new
        if deltas.push(ids):
          yield dataclasses.replace(conversation, pending=(question, deltas.sent))
      tokens = future.result()
    finally:
      if not future.done():
        engine.cancel(future)
    rounds = conversation.rounds + ((question, self.service.decode(tokens)),)
    yield dataclasses.replace(conversation, rounds=rounds, pending=None)


def import_gradio():
  """Returns the gradio module, analytics off; UserError naming the extra if it is not installed."""
  # Read when gradio is imported and when a Blocks is made: no usage reports, no version checks.
  os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
  try:
    import gradio  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError(f"the demo needs gradio: {INSTALL_HINT}") from None
  return gradio


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
  """Returns the page (a gradio Blocks) driving `demo`, `examples` (video files) listed under the player.

  Gradio copies each example into its own cache as the page is built and serves that copy, so the
  example's folder is never served.
  """
  from vtimellm_jax.inference import chat_request, generate  # pylint: disable=g-import-not-at-top

  gr = import_gradio()

  def warn(error: Exception) -> None:
    # Called in an except block. A mistake is a warning toast (its message, escaped: gradio renders
    # it as HTML) and one line in the terminal; anything else is a bug, whose traceback goes there.
    if isinstance(error, UserError):
      _log.warning("demo: %s", error.__cause__ or error)
      gr.Warning(html.escape(str(error), quote=False))
    else:
      _log.exception("demo: the page's request failed")
      gr.Warning(f"something went wrong ({html.escape(type(error).__name__)}); "
                 f"the terminal running the demo has the details")

  # Every handler returns the page as it should be, whatever happened: an exception raised into
  # gradio would cover every output with an error badge and hide the conversation.
  def on_video(path, conversation):
    try:
      conversation = demo.open_video(path)
    except Exception as e:  # pylint: disable=broad-except
      warn(e)  # the conversation so far stays
    return conversation.messages(), conversation.timeline(), conversation

  def on_question(path, question, conversation):
    conversation = dataclasses.replace(conversation, pending=None)
    try:
      if path and path != conversation.video:  # the video changed and its event has not run yet
        conversation = demo.open_video(path)
      conversation = demo.pose(conversation, question or "")
    except Exception as e:  # pylint: disable=broad-except
      warn(e)
      return conversation.messages(), conversation.timeline(), conversation, gr.skip()  # the question stays typed
    return conversation.messages(), conversation.timeline(), conversation, ""

  def on_answer(temperature, conversation):
    if conversation.pending is None:  # on_question refused it
      yield gr.skip(), gr.skip(), gr.skip()
      return
    try:
      for conversation_so_far in demo.answer(conversation, temperature):
        if conversation_so_far.pending is not None:
          yield conversation_so_far.messages(), gr.skip(), gr.skip()
      conversation = conversation_so_far
    except Exception as e:  # pylint: disable=broad-except
      warn(e)
      conversation = dataclasses.replace(conversation, pending=None)
    yield conversation.messages(), conversation.timeline(), conversation

  def on_clear(conversation):
    conversation = dataclasses.replace(conversation, rounds=(), pending=None)
    return conversation.messages(), conversation.timeline(), conversation

  with gr.Blocks(title="VTimeLLM demo", analytics_enabled=False) as app:
    state = gr.State(Conversation())
    gr.Markdown("## VTimeLLM\nAsk when something happens in the video; click a moment to play it.")
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
                              elem_id=QUESTION_ID, lines=1, max_lines=4)
        with gr.Row():
          ask = gr.Button("Ask", variant="primary", elem_id="vtimellm-ask")
          clear = gr.Button("Clear conversation", elem_id="vtimellm-clear")
        temperature = gr.Slider(0, chat_request.MAX_TEMPERATURE, value=generate.RELEASE_TEMPERATURE, step=0.01,
                                label="Temperature", info="0 is greedy; the release samples with 0.05")
    # One model, one request at a time, in the order asked: encoding a video, showing a question,
    # answering it and clearing share the queue, so each sees the conversation the one before left.
    shared = {"concurrency_id": "model", "concurrency_limit": 1}
    video.change(on_video, [video, state], [chat, timeline, state], **shared)
    for trigger in (ask.click, question.submit):
      # Two steps: the question shows at once, then its answer streams in.
      trigger(on_question, [video, question, state], [chat, timeline, state, question], **shared).then(
          on_answer, [temperature, state], [chat, timeline, state], **shared)
    # The chat's own trash button empties the chat on the page; the conversation must follow.
    for trigger in (clear.click, chat.clear):
      trigger(on_clear, [state], [chat, timeline, state], **shared)
  return app


def launch(app, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, block: bool = True) -> str:
  """Serves the page on host:port; returns its URL (at once with block=False, else when stopped).

  Gradio's own start-up lines (among them a share-link hint this command cannot act on) are off;
  a blocking launch prints the page's address itself. No folder is added to what gradio serves.
  """
  gr = import_gradio()
  theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                            font_mono=["ui-monospace", "monospace"])
  try:
    _, url, _ = app.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=True,
                           head=PAGE_SCRIPT, css=CSS, theme=theme, allowed_paths=[], ssr_mode=False,
                           enable_monitoring=False, mcp_server=False, pwa=False, footer_links=[], quiet=True)
  except OSError as e:
    raise UserError(f"cannot serve the demo on {host}:{port}: {e}") from None
  if block:
    print(f"vtimellm-jax demo: open {url} (Ctrl-C stops it)", file=sys.stderr, flush=True)
    try:
      while app.is_running:
        time.sleep(0.5)
    finally:
      app.close(verbose=False)
  return url


def serve(model: str, clip: str | None = None, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          dtype: str = "auto", max_new_tokens: int | None = None,
          examples: Sequence[str | os.PathLike] = (), quant: str = "none") -> None:
  """Loads `--model` (a model directory or a quickstart workdir) and serves the demo until stopped."""
  from vtimellm_jax.inference import generate, served, server  # pylint: disable=g-import-not-at-top

  import_gradio()  # before minutes of loading, fail on a missing gradio or example
  example_paths = check_examples(examples)
  if served.resolve(model, clip).clip is None:
    raise UserError("the demo encodes the videos it is given: pass --clip (a CLIP model directory) with a "
                    "model directory; a quickstart workdir names its own")
  # One slot: the page answers one question at a time (its queue's concurrency limit).
  service = server.load_service(model, clip, slots=1, context=None, media_roots=[],
                                max_new_tokens=max_new_tokens or generate.RELEASE_MAX_NEW_TOKENS, max_waiting=8,
                                dtype=dtype, quant=quant)
  try:
    launch(build_app(Demo(service), example_paths), host, port, block=True)
  finally:
    service.engine.close()
