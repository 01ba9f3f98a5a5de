"""The design claim of the synthetic corpus: a randomly initialised tiny CLIP already tells the events apart.

The quickstart encodes frames with `extract-features --clip tiny-random`; grounding can only be
learnt if the CLS embedding of a frame says which colour is on screen (colour alone identifies an
event within a video, see `vocabulary.py`). The model's adapter is linear, so the test is a linear
probe: ridge regression to the colour (or background) fitted on squares and circles, scored on
triangles and crosses, over each kind of motion at several moments of its progress.
"""

import numpy as np
import pytest

from vtimellm_jax.data_pipelines.synthetic import render, vocabulary
from vtimellm_jax.models import clip as clip_model, load
from vtimellm_jax.video import preprocess

SIZE = 64
# One motion of each kind (sliding, moving, size change, rotation): enough poses, few frames (speed).
MOTIONS = ("slides to the left", "moves up", "grows", "spins")


def _frames(shapes: tuple[str, ...], progress: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
  """Returns (uint8[F, SIZE, SIZE, 3] frames, str[F] colour labels); three empty frames are 'background'."""
  frames, labels = [], []
  for colour, rgb in vocabulary.COLOURS.items():
    for shape in shapes:
      for motion in MOTIONS:
        masks = render.shape_masks(shape, motion, np.array(progress), SIZE)
        clip = np.zeros((len(progress), SIZE, SIZE, 3), np.uint8)
        clip[masks] = rgb
        frames.append(clip)
        labels += [colour] * len(progress)
  frames.append(np.zeros((3, SIZE, SIZE, 3), np.uint8))
  labels += ["background"] * 3
  return np.concatenate(frames), np.array(labels)


@pytest.mark.parametrize("seed", [0, 1])
def test_random_tiny_clip_separates_colours_across_shapes(seed):
  model = load.random_clip(clip_model.tiny(), seed)

  def embed(frames):
    return np.concatenate([np.asarray(model.encode_image(preprocess.to_pixels(frames[i:i + 128])), np.float64)
                           for i in range(0, len(frames), 128)])

  fit_frames, fit_labels = _frames(("square", "circle"), (0.0, 1.0))
  test_frames, test_labels = _frames(("triangle", "cross"), (0.3, 0.7))
  fit, test = embed(fit_frames), embed(test_frames)
  mu, sd = fit.mean(axis=0), fit.std(axis=0) + 1e-6
  fit, test = (fit - mu) / sd, (test - mu) / sd
  classes = np.array(sorted(set(fit_labels)))
  one_hot = (fit_labels[:, None] == classes[None]).astype(np.float64)
  weights = np.linalg.solve(fit.T @ fit + 10.0 * np.eye(fit.shape[1]), fit.T @ one_hot)
  predicted = classes[(test @ weights).argmax(axis=1)]
  # Chance is 1/7; a probe that only saw other shapes must still name the colour almost always.
  assert (predicted == test_labels).mean() >= 0.85
