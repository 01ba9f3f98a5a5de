"""VTimeLLM in JAX / Flax NNX.

Layers, lowest first; a module imports only from its own layer or below (tests/test_layers.py):

0. `errors`, `cli_types`, `sharding`, `model_io`, `xla_flags`, `device_peaks`: errors, flag types,
   the logical-axis rules, the model-directory format, the XLA flags the answering commands set,
   each accelerator's peak FLOP/s and memory bandwidth.
1. `models` (LLaMA, LoRA, CLIP, VTimeLLM, the KV cache, the answering layout, the one loader),
   `data` (records, templates, tokenizer,
   the Grain pipeline), `evaluation` (answer logs, annotations, metrics).
2. `convert`: Hugging Face / PyTorch / release checkpoints to model directories and back;
   `data_pipelines`: ArrayRecord/TFDS corpora and the synthetic corpus.
3. `video`: decoding, frame sampling and CLIP feature extraction.
4. `inference` (generation, chat, the benchmark run) and `training` (config loading, the step, the trainer).
5. `bench`, `quickstart`, `cli`: commands over everything below.
6. `configs`: the stage configs and topology presets. The library reads them only by path
   (`training/config_files.py`), never by importing them.

`configs` and `data_pipelines` live at the repository's top level; `vtimellm_jax/configs` and
`vtimellm_jax/data_pipelines` are links to them, so a checkout, an editable install and a wheel all
import them as `vtimellm_jax.configs` and `vtimellm_jax.data_pipelines` (a wheel holds copies).

Within a package, `*_cli.py` modules parse arguments and call the library; no library module
imports one.
"""

__version__ = "0.1.0"
