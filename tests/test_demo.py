"""`vtimellm-jax demo`: answers rendered with moment chips in seconds, escaped; the timeline with its
ticks and playhead; the conversation a page keeps, its answers streamed as `chat` gives them; errors as
warnings that keep the conversation; only the example files served. The page in a real browser:
test_quickstart_learns.py."""

import contextlib
import html.parser
import io
import itertools
import json
import logging
import pathlib
import re
import socket
import sys
import types
import urllib.error
import urllib.request

import jax
import numpy as np
import pytest
from inference_fixtures import tiny_vtimellm  # noqa: F401

from vtimellm_jax import cli
from vtimellm_jax.errors import UserError
from vtimellm_jax.inference import answerer, batching, demo, demo_cli, generate, server


class _Tags(html.parser.HTMLParser):
  """Every start tag (name, attributes) of a piece of HTML, and its text."""

  def __init__(self, text: str):
    super().__init__()
    self.tags, self.text = [], []
    self.feed(text)

  def handle_starttag(self, tag, attrs):
    self.tags.append((tag, dict(attrs)))

  def handle_data(self, data):
    self.text.append(data)

  def chips(self, extra_class: str = "") -> list[dict]:
    wanted = {demo.CHIP_CLASS, extra_class} - {""}
    return [a for _, a in self.tags if wanted <= set(a.get("class", "").split())]


def test_answer_chips_carry_each_moments_seconds_and_keep_the_text():
  answer = "A man walks from 10 to 25, then In red 50 to 99."
  parsed = _Tags(demo.render_answer(answer, 80.0))
  chips = parsed.chips()
  assert [(float(c["data-start"]), float(c["data-end"])) for c in chips] == [(8.0, 20.0), (40.0, 79.2)]
  assert all(t == "button" for t, a in parsed.tags if a in chips)
  text = "".join(parsed.text)
  assert "8.0s – 20.0s" in text and "40.0s – 79.2s" in text
  # The answer reads as it was written, each chip right after its moment.
  assert text.replace(" 8.0s – 20.0s", "").replace(" 40.0s – 79.2s", "") == answer


def test_chip_seconds_follow_the_duration():
  chips = _Tags(demo.render_answer("from 33 to 66", 14.9)).chips()
  assert [float(chips[0]["data-start"]), float(chips[0]["data-end"])] == pytest.approx([0.33 * 14.9, 0.66 * 14.9], abs=1e-3)


def test_without_a_duration_there_are_no_chips():
  assert _Tags(demo.render_answer("from 10 to 20", None)).chips() == []


def test_model_and_user_text_is_escaped():
  evil = '<img src=x onerror="alert(1)"> from 10 to 20 <script>x()</script> & "quoted"'
  for rendered in (demo.render_answer(evil, 10.0), demo.render_question(evil)):
    parsed = _Tags(rendered)
    assert {t for t, _ in parsed.tags} <= {"div", "button", "span"}
    assert "".join(parsed.text).startswith(evil.split(" from")[0])


def test_timeline_has_one_bar_per_moment_placed_over_the_duration():
  answers = ["from 10 to 20, then from 30 to 40.", "Nothing to place.", "In red 60 to 50."]
  parsed = _Tags(demo.render_timeline(answers, 50.0))
  bars = parsed.chips(demo.BAR_CLASS)
  assert [float(b["data-start"]) for b in bars] == [5.0, 15.0, 30.0]
  assert [b["style"] for b in bars] == ["left: 10%; width: 10%;", "left: 30%; width: 10%;",
                                        "left: 50%; width: 10%;"]  # a reversed moment still spans its frames
  labels = [a for t, a in parsed.tags if a.get("class") == "vt-row-label"]
  assert len(labels) == 2 and "A3" in parsed.text and "A2" not in parsed.text
  assert float([a for _, a in parsed.tags if "data-duration" in a][0]["data-duration"]) == 50.0


def test_timeline_without_video_or_moments_has_no_bars():
  assert _Tags(demo.render_timeline(["from 10 to 20"], None)).chips() == []
  assert _Tags(demo.render_timeline(["no moment here"], 30.0)).chips() == []
  assert _Tags(demo.render_timeline(["from 40 to 40"], 30.0)).chips(demo.BAR_CLASS)[0]["style"].endswith(
      f"width: {demo.MIN_BAR_PERCENT}%;")


def test_timeline_has_time_ticks_under_it_and_a_playhead():
  for duration, seconds, labels in (
      (50.0, [0, 10, 20, 30, 40, 50], ["0s", "10s", "20s", "30s", "40s", "50s"]),
      (7.5, [0, 1, 2, 3, 4, 5, 6, 7], ["0s", "1s", "2s", "3s", "4s", "5s", "6s", "7s"]),
      (73.1, [0, 10, 20, 30, 40, 50, 60, 70], ["0:00", "0:10", "0:20", "0:30", "0:40", "0:50", "1:00", "1:10"]),
      (3 * 3600.0, [0, 1800, 3600, 5400, 7200, 9000, 10800],
       ["0:00", "30:00", "1:00:00", "1:30:00", "2:00:00", "2:30:00", "3:00:00"])):
    for answers in (["from 10 to 20"], []):  # with moments or none yet: the axis and the playhead are there
      parsed = _Tags(demo.render_timeline(answers, duration))
      ticks = [a for _, a in parsed.tags if a.get("class") == demo.TICK_CLASS]
      assert [float(t["data-seconds"]) for t in ticks] == seconds
      assert [float(re.fullmatch(r"left: ([\d.]+)%;", t["style"])[1]) for t in ticks] == pytest.approx(
          [100 * s / duration for s in seconds], abs=1e-3)
      assert [t for t in parsed.text if t in labels] == labels
      [playhead] = [a for _, a in parsed.tags if a.get("class") == demo.PLAYHEAD_CLASS]
      assert playhead["style"] == "left: 0%;"
  assert not [a for _, a in _Tags(demo.render_timeline([], None)).tags if a.get("class") == demo.PLAYHEAD_CLASS]


def test_short_bars_write_their_start_beside_them():
  parsed = _Tags(demo.render_timeline(["from 40 to 42, from 90 to 92 and from 10 to 60."], 50.0))
  classes = [set(b["class"].split()) for b in parsed.chips(demo.BAR_CLASS)]
  assert ["vt-short" in c for c in classes] == [True, True, False]
  assert ["vt-label-before" in c for c in classes] == [False, True, False]
  assert [t for t in parsed.text if t.endswith("s")][:2] == ["20.0s", "45.0s"]
  assert "5.0s – 30.0s" in parsed.text  # a wide bar keeps its range


class _FakeVideos:
  """A video cache over named videos: path -> (features, duration)."""

  def __init__(self, videos):
    self.videos = videos

  def __call__(self, path):
    if path not in self.videos:
      raise UserError(f"{path}: video file not found")
    return self.videos[path]


CONTEXT = 384


@pytest.fixture(scope="module")
def page(tiny_vtimellm):  # noqa: F811
  """A Demo on the tiny model, answering through the server's ChatService on a one-slot engine."""
  rng = np.random.RandomState(0)
  videos = {"a.mp4": (rng.normal(0, 0.2, (100, 768)).astype(np.float32), 20.0),
            "b.mp4": (rng.normal(0, 0.2, (100, 768)).astype(np.float32), 10.0)}
  engine = batching.Engine(answerer.load_answerer(tiny_vtimellm.model_dir), slots=1, context=CONTEXT)
  yield demo.Demo(server.ChatService(engine, _FakeVideos(videos), server.MediaRoots([]), 12, "tiny"))
  engine.close()


def _chat_answer(page, history, question, temperature, seed=0):
  """Returns `chat`'s answer: Answerer.answer with round r's key fold_in(key(seed), r)."""
  features, _ = page.service.videos("a.mp4")
  config = generate.GenerationConfig(max_new_tokens=12, temperature=temperature)
  key = jax.random.fold_in(jax.random.key(seed), len(history))
  answer, = page.service.engine.bot.answer([(history, question)], [features], config, key[None])
  return answer.text


def test_answers_stream_in_and_equal_chats(page):
  conversation = page.open_video("a.mp4")
  assert (conversation.duration, conversation.rounds, conversation.pending) == (20.0, (), None)
  asked = page.pose(conversation, "  during which frames can we see a man?  ")
  assert asked.pending == ("during which frames can we see a man?", "")
  # The question shows before any answer: a user bubble, then an answer bubble still pending.
  assert [m["role"] for m in asked.messages()] == ["user", "assistant"]
  assert demo.PENDING_CLASS in asked.messages()[1]["content"]
  *streamed, first = page.answer(asked, 0.0)
  text = first.rounds[0][1]
  assert first.pending is None and first.rounds[0][0] == "during which frames can we see a man?"
  assert text == _chat_answer(page, [], "<video>\nduring which frames can we see a man?", 0.0)
  # The answer came in pieces, each a longer beginning of the whole.
  so_far = [c.pending[1] for c in streamed]
  assert len(so_far) >= 2 and all(a and text.startswith(a) for a in so_far)
  assert all(len(a) < len(b) for a, b in itertools.pairwise(so_far))
  # Round 2, sampled: the history holds <video> in its first question, the key is folded with 1.
  *_, second = page.answer(page.pose(first, "and a dog?"), 0.9)
  assert second.rounds[0] == first.rounds[0]
  assert second.rounds[1] == ("and a dog?", _chat_answer(
      page, [("<video>\nduring which frames can we see a man?", text)], "and a dog?", 0.9))
  assert [m["role"] for m in second.messages()] == ["user", "assistant"] * 2
  # Another video: a new conversation, timed by its own length.
  other = page.open_video("b.mp4")
  assert other.rounds == () and other.duration == 10.0


def test_asking_without_a_video_or_a_question_is_a_user_error(page):
  with pytest.raises(UserError, match="upload a video"):
    page.pose(page.open_video(None), "when?")
  with pytest.raises(UserError, match="type a question"):
    page.pose(page.open_video("a.mp4"), "  ")
  too_long = demo.Conversation("a.mp4", 20.0, (("what?", "word " * 400),), ("and then?", ""))
  with pytest.raises(UserError, match=f"fills the model's {CONTEXT} positions"):
    next(page.answer(too_long, 0.0))
  assert page.service.engine.busy == 0 and page.service.engine.waiting == 0


def test_a_bad_upload_is_named_by_its_own_name_in_plain_words(tmp_path):
  from vtimellm_jax.inference import served  # pylint: disable=g-import-not-at-top

  upload = tmp_path / "gradio" / "0c9f1e" / "holiday clip.mp4"  # where gradio keeps an upload
  upload.parent.mkdir(parents=True)
  upload.write_bytes(b"not a video")
  notes = upload.parent / "notes.txt"
  notes.write_text("hello")
  videos = served.VideoCache(served.ServedModel(tmp_path, "tiny-random-64"))
  page = demo.Demo(types.SimpleNamespace(videos=videos))
  for path, says in ((upload, "holiday clip.mp4: cannot be read as a video: the file is damaged"),
                     (notes, "notes.txt: not a video file (this page reads mp4, mkv, webm"),
                     (upload.parent / "gone.mp4", "gone.mp4: the file is gone; upload it again")):
    with pytest.raises(UserError) as raised:
      page.open_video(path)
    message = str(raised.value)
    assert message.startswith(says) and str(tmp_path) not in message and "Error" not in message
    assert str(path) in str(raised.value.__cause__)  # the reader's own words, for the terminal


def _handlers(app) -> dict:
  return {f.fn.__name__: f.fn for f in app.fns.values()}


def test_errors_are_warnings_that_keep_the_conversation(page, monkeypatch, caplog):
  gr = pytest.importorskip("gradio")
  fns = _handlers(demo.build_app(page))
  skip = gr.skip()
  talk = demo.Conversation("a.mp4", 20.0, (("when?", "In red 10 to 50."),))
  kept = (talk.messages(), talk.timeline(), talk)
  caplog.set_level(logging.WARNING, logger=demo.__name__)

  # An empty question: a warning; the chat, the timeline and the typed text stay; no answer runs.
  with pytest.warns(UserWarning, match="type a question"):
    out = fns["on_question"]("a.mp4", "  ", talk)
  assert out == (*kept, skip)
  assert list(fns["on_answer"](0.05, out[2])) == [(skip, skip, skip)]
  with pytest.warns(UserWarning, match="upload a video"):
    assert fns["on_question"](None, "when?", demo.Conversation())[2] == demo.Conversation()

  # A video that cannot be opened: a warning in the page's words; the conversation stays.
  with pytest.warns(UserWarning, match=r"^missing\.mp4: the file is gone"):
    assert fns["on_video"]("/tmp/gradio/0c9f1e/missing.mp4", talk) == kept
  record = caplog.records[-1]  # one line in the terminal, the reader's words, no traceback
  assert record.getMessage() == "demo: /tmp/gradio/0c9f1e/missing.mp4: video file not found"
  assert record.exc_info is None

  # A conversation too long for the model: the question is refused, the conversation stays.
  too_long = demo.Conversation("a.mp4", 20.0, (("what?", "word " * 400),))
  asked = fns["on_question"]("a.mp4", "and then?", too_long)[2]
  with pytest.warns(UserWarning, match="fills the model's"):
    answered = list(fns["on_answer"](0.0, asked))
  assert answered == [(too_long.messages(), too_long.timeline(), too_long)]

  # A bug: a warning that points to the terminal, where its traceback goes; the conversation stays.
  asked = fns["on_question"]("a.mp4", "and then?", talk)[2]
  monkeypatch.setattr(page, "answer", lambda *_: iter([1 / 0]))
  with pytest.warns(UserWarning, match=r"something went wrong \(ZeroDivisionError\)"):
    assert list(fns["on_answer"](0.0, asked)) == [kept]
  assert caplog.records[-1].exc_info[0] is ZeroDivisionError


def test_a_question_shows_at_once_and_its_answer_streams_in(page):
  gr = pytest.importorskip("gradio")
  fns = _handlers(demo.build_app(page))
  talk = demo.Conversation("a.mp4", 20.0, (("when?", "In red 10 to 50."),))
  chat, timeline, asked, typed = fns["on_question"]("a.mp4", " and a dog? ", talk)
  assert typed == "" and asked.pending == ("and a dog?", "") and timeline == talk.timeline()
  assert chat[:2] == talk.messages() and chat[2] == {"role": "user", "content": demo.render_question("and a dog?")}
  assert demo.PENDING_CLASS in chat[3]["content"]
  *streamed, (chat, timeline, done) = fns["on_answer"](0.0, asked)
  # While it streams only the chat changes; the answered round then reaches the timeline and the state.
  assert streamed and all(out[1:] == (gr.skip(), gr.skip()) and demo.PENDING_CLASS in out[0][3]["content"]
                          for out in streamed)
  assert done.pending is None and done.rounds[:1] == talk.rounds and done.rounds[1][0] == "and a dog?"
  assert (chat, timeline) == (done.messages(), done.timeline()) and demo.PENDING_CLASS not in str(chat)
  # A question about another video than the conversation's opens it first: a new conversation.
  _, _, other, _ = fns["on_question"]("b.mp4", "when?", done)
  assert (other.video, other.duration, other.rounds, other.pending) == ("b.mp4", 10.0, (), ("when?", ""))
  assert fns["on_clear"](done)[2] == demo.Conversation("a.mp4", 20.0)


def test_page_escapes_its_chat_and_lets_temperature_reach_2(page):
  gr = pytest.importorskip("gradio")
  app = demo.build_app(page)
  # The chat shows our HTML as is: no sanitiser (it drops data-start) and no markdown (a model's
  # text could make links); that is safe only because every text is escaped above.
  [chat] = [b for b in app.blocks.values() if isinstance(b, gr.Chatbot)]
  assert (chat.sanitize_html, chat.render_markdown, chat.latex_delimiters) == (False, False, [])
  [player] = [b for b in app.blocks.values() if isinstance(b, gr.Video)]
  assert player.elem_id == demo.PLAYER_ID
  [temperature] = [b for b in app.blocks.values() if isinstance(b, gr.Slider)]
  assert (temperature.minimum, temperature.maximum, temperature.value) == (0, 2.0, generate.RELEASE_TEMPERATURE)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _get(url: str) -> tuple[int, bytes]:
  try:
    with urllib.request.urlopen(url, timeout=60) as reply:
      return reply.status, reply.read()
  except urllib.error.HTTPError as e:
    return e.code, e.read()


def test_only_the_example_files_are_served_not_their_folder(page, tmp_path):
  pytest.importorskip("gradio")
  folder = tmp_path / "examples"
  folder.mkdir()
  clip = folder / "clip.mp4"
  clip.write_bytes(b"an example video's bytes")
  (folder / "example_log.txt").write_text("private notes beside the example")
  app = demo.build_app(page, demo.check_examples([clip]))
  # Gradio prints to stdout. Not capsys: uvicorn's logging setup closes absl's handler, whose stream
  # would then be pytest's own capture once capsys has replaced sys.stderr.
  with contextlib.redirect_stdout(io.StringIO()) as printed:
    url = demo.launch(app, "127.0.0.1", _free_port(), block=False)
    try:
      config = json.loads(_get(url + "config")[1])
      [dataset] = [c for c in config["components"] if c["type"] == "dataset"]
      [[sample]] = dataset["props"]["samples"]
      assert sample["orig_name"] == "clip.mp4" and str(folder) not in sample["path"]
      assert _get(sample["url"]) == (200, clip.read_bytes())  # gradio's own copy of the example
      for private in (folder / "example_log.txt", clip, folder):
        status, body = _get(f"{url}gradio_api/file={private}")
        assert status == 403 and b"private notes" not in body, private
    finally:
      app.close(verbose=False)
  assert "share=True" not in printed.getvalue() and "Running on" not in printed.getvalue()


def test_examples_are_listed_under_the_player_and_a_missing_one_is_refused(page, monkeypatch, capsys, tmp_path):
  gr = pytest.importorskip("gradio")
  assert not [b for b in demo.build_app(page).blocks.values() if isinstance(b, gr.Dataset)]
  clip = tmp_path / "clip.mp4"
  clip.write_bytes(b"")
  app = demo.build_app(page, demo.check_examples([clip]))
  [examples] = [b for b in app.blocks.values() if isinstance(b, gr.Dataset)]
  assert examples.raw_samples == [[str(clip.resolve())]]
  monkeypatch.setattr(demo, "launch", lambda *a, **k: pytest.fail("served a page with a missing example"))
  assert cli.main(["demo", "--model", str(tmp_path), "--example", str(tmp_path / "gone.mp4")]) == 2
  err = capsys.readouterr().err
  assert "gone.mp4: no such video file" in err and "Traceback" not in err


def test_a_checkout_lists_the_release_demo_video_by_default(official_fixtures, monkeypatch, tmp_path):
  assert demo_cli.checkout_examples() == [official_fixtures / "demo.mp4"]
  given = []
  monkeypatch.setattr(demo, "serve", lambda *args, **options: given.append(args[-1]))
  mine = tmp_path / "mine.mp4"
  assert cli.main(["demo", "--model", "m"]) == 0 and cli.main(["demo", "--model", "m", "--example", str(mine)]) == 0
  assert given == [[official_fixtures / "demo.mp4"], [str(mine)]]
  # The library module never reads from tests/: the command hands it the checkout's file.
  source = pathlib.Path(demo.__file__).read_text()
  assert not re.search(r"\btests\b|fixtures", source)
  # Outside a checkout (an installed package: no pyproject.toml beside the package) there is none.
  monkeypatch.setattr(demo_cli, "_CHECKOUT", tmp_path)
  assert demo_cli.checkout_examples() == []


def test_demo_without_gradio_names_the_extra(monkeypatch, capsys, tmp_path):
  monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio now raises ImportError
  assert cli.main(["demo", "--model", str(tmp_path)]) == 2
  assert "pip install 'vtimellm-jax[demo]'" in capsys.readouterr().err


def test_demo_with_a_bad_model_exits_2_before_serving(monkeypatch, capsys, tmp_path):
  monkeypatch.setattr(demo, "import_gradio", lambda: None)
  monkeypatch.setattr(demo, "launch", lambda *a, **k: pytest.fail("served a page without a model"))
  assert cli.main(["demo", "--model", str(tmp_path / "nowhere")]) == 2
  err = capsys.readouterr().err
  assert "nowhere" in err and "Traceback" not in err
