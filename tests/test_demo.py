"""`vtimellm-jax demo`: answers rendered with moment chips in seconds, escaped; the timeline; the
conversation a page keeps; clean errors. The page in a real browser: test_quickstart_learns.py."""

import html.parser
import sys

import numpy as np
import pytest

from vtimellm_jax import cli
from vtimellm_jax.errors import UserError
from vtimellm_jax.inference import demo


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
    assert {t for t, _ in parsed.tags} <= {"div", "button"}
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


class _FakeBot:
  """Records what it is asked; answers with a moment numbered by the round."""

  def __init__(self):
    self.calls = []

  def answer(self, conversations, features, config, keys):
    self.calls.append((conversations, features, config, keys))
    history, _ = conversations[0]
    return [type("Answer", (), {"text": f"In red {len(history):02d} to 50."})()]


class _FakeVideos:
  """A video cache over named videos: path -> (features, duration)."""

  def __init__(self, videos):
    self.videos = videos

  def __call__(self, path):
    if path not in self.videos:
      raise UserError(f"{path}: video file not found")
    return self.videos[path]


def _demo():
  videos = {"a.mp4": (np.zeros((100, 8), np.float32), 20.0), "b.mp4": (np.ones((100, 8), np.float32), 10.0)}
  return demo.Demo(_FakeBot(), _FakeVideos(videos), max_new_tokens=7), videos


def test_conversation_rounds_reach_the_model_as_chat_does():
  import jax  # pylint: disable=g-import-not-at-top

  page, videos = _demo()
  conversation = page.open_video("a.mp4")
  assert conversation.duration == 20.0 and conversation.rounds == ()
  conversation = page.ask(conversation, "  first?  ", 0.0)
  conversation = page.ask(conversation, "second?", 0.7)
  (first, f1, c1, k1), (second, f2, c2, k2) = page.bot.calls
  assert first == [([], "<video>\nfirst?")]
  assert second == [([("<video>\nfirst?", "In red 00 to 50.")], "second?")]
  assert f1[0] is videos["a.mp4"][0] and f2[0] is videos["a.mp4"][0]  # the cached features, reused
  assert (c1.temperature, c2.temperature, c1.max_new_tokens) == (0.0, 0.7, 7)
  assert k1.shape == (1,) and not np.array_equal(jax.random.key_data(k1), jax.random.key_data(k2))
  assert [m["role"] for m in conversation.messages()] == ["user", "assistant"] * 2
  assert len(_Tags(conversation.timeline()).chips(demo.BAR_CLASS)) == 2
  # Another video: a new conversation, timed by its own length.
  other = page.open_video("b.mp4")
  assert other.rounds == () and other.duration == 10.0


def test_asking_without_a_video_or_a_question_is_a_user_error():
  page, _ = _demo()
  with pytest.raises(UserError, match="upload a video"):
    page.ask(page.open_video(None), "when?", 0.05)
  with pytest.raises(UserError, match="type a question"):
    page.ask(page.open_video("a.mp4"), "  ", 0.05)
  with pytest.raises(UserError, match="not found"):
    page.open_video("missing.mp4")


def test_a_video_that_cannot_be_decoded_is_a_user_error(tmp_path):
  from vtimellm_jax.inference import served  # pylint: disable=g-import-not-at-top

  bad = tmp_path / "bad.mp4"
  bad.write_bytes(b"not a video")
  videos = served.VideoCache(served.ServedModel(tmp_path, "tiny-random-64"))
  page = demo.Demo(_FakeBot(), videos, max_new_tokens=4)
  with pytest.raises(UserError, match="bad.mp4"):
    page.open_video(bad)
  with pytest.raises(UserError, match="not found"):
    page.open_video(tmp_path / "gone.mp4")


def test_page_turns_user_errors_into_messages_and_escapes_its_chat():
  gr = pytest.importorskip("gradio")
  page, _ = _demo()
  app = demo.build_app(page)
  fns = {f.fn.__name__: f.fn for f in app.fns.values()}
  with pytest.raises(gr.Error, match="missing.mp4: video file not found"):
    fns["on_video"]("missing.mp4")
  with pytest.raises(gr.Error, match="upload a video"):
    fns["on_ask"](None, "when?", 0.05, demo.Conversation())
  messages, timeline, conversation, cleared = fns["on_ask"]("a.mp4", "when?", 0.05, demo.Conversation())
  assert conversation.video == "a.mp4" and cleared == "" and len(messages) == 2
  # The chat shows our HTML as is: no sanitiser (it drops data-start) and no markdown (a model's
  # text could make links); that is safe only because every text is escaped above.
  [chat] = [b for b in app.blocks.values() if isinstance(b, gr.Chatbot)]
  assert (chat.sanitize_html, chat.render_markdown, chat.latex_delimiters) == (False, False, [])
  [player] = [b for b in app.blocks.values() if isinstance(b, gr.Video)]
  assert player.elem_id == demo.PLAYER_ID


def test_examples_are_listed_under_the_player_and_a_missing_one_is_refused(monkeypatch, capsys, tmp_path):
  gr = pytest.importorskip("gradio")
  page, _ = _demo()
  assert not [b for b in page_blocks(demo.build_app(page)) if isinstance(b, gr.Dataset)]
  clip = tmp_path / "clip.mp4"
  clip.write_bytes(b"")
  [examples] = [b for b in page_blocks(demo.build_app(page, demo.check_examples([clip]))) if isinstance(b, gr.Dataset)]
  assert examples.raw_samples == [[str(clip.resolve())]]
  monkeypatch.setattr(demo, "launch", lambda *a, **k: pytest.fail("served a page with a missing example"))
  assert cli.main(["demo", "--model", str(tmp_path), "--example", str(tmp_path / "gone.mp4")]) == 2
  err = capsys.readouterr().err
  assert "gone.mp4: no such video file" in err and "Traceback" not in err


def test_a_checkout_lists_the_release_demo_video_by_default(official_fixtures):
  assert demo.default_examples() == [official_fixtures / "demo.mp4"]
  assert demo.check_examples([official_fixtures / "demo.mp4"]) == demo.default_examples()


def page_blocks(app):
  return list(app.blocks.values())


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
