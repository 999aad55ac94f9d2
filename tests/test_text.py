"""The text side (fairkd_utils.multinli, .text_models, .synthetic_text): the negation
attribute, reading MultiNLI from a local folder (and every bad input), tiny BERTs saved
and loaded locally, the early exit's layer and detachment, the synthetic_text
miniature, and the three-class exit Laplace against laplace-torch."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fairkd_utils import multinli, synthetic_text, text_models
from fairkd_utils.exit_laplace import ExitLaplace, fit_exit_laplace, phi_tilde
from fairkd_utils.models import ExitHead, StudentOutput

from fakes import NEG_HYPS, POS_HYPS, make_fake_tokenizer_folder
from fakes import TEXT_COUNTS as FAKE_COUNTS
from fakes import fake_multinli_rows as fake_rows
from fakes import write_multinli_table as write_table

torch.set_num_threads(2)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A BERT WordPiece tokenizer over ~70 made-up words, saved with save_pretrained."""
    pytest.importorskip("transformers")
    return make_fake_tokenizer_folder(tmp_path_factory.mktemp("tok") / "saved")


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return text_models.load_tokenizer(tokenizer_dir)


def tiny_cfg(vocab_size=60, hidden=16, layers=3, heads=2, max_length=40, dropout=0.0):
    return text_models.bert_config(vocab_size, hidden_size=hidden, num_layers=layers,
                                   num_heads=heads, max_length=max_length, dropout=dropout)


# --------------------------------------------------------------------------- negation


def test_negation_attribute_is_group_dros_word_test_after_deleting_punctuation():
    cases = {
        "I know the dog.": 0,                     # "no" inside a word is not the word
        "Nothing's changed at all.": 0,           # apostrophe deleted -> "nothings"
        "nothing changed": 1,
        "No, the cat sat there.": 1,              # sentence start, comma
        "They will NEVER come back": 1,           # upper case
        "nobody.": 1,                             # trailing punctuation
        "(nobody) came": 1,
        "Someone came; nobody's fault": 0,        # "nobodys"
        "no-one came": 0,                         # hyphen deleted -> "noone"
        "The notice is not here": 0,              # "not" is not one of the four words
        "the answer is no": 1,
        "\u201cNo\u201d, she said": 0,            # non-ASCII quotes are not string.punctuation
        "no\tway": 0,                             # only single spaces split words
        "": 0,
    }
    got = multinli.negation_attribute(list(cases))
    assert got.dtype == np.int64 and got.tolist() == list(cases.values())
    assert multinli.negation_attribute(iter(["never", "know"])).tolist() == [1, 0]
    with pytest.raises(TypeError, match="list of hypotheses"):
        multinli.negation_attribute("no way")
    with pytest.raises(TypeError, match="not str"):
        multinli.negation_attribute(["fine", None])


# --------------------------------------------------------------------------- reading MultiNLI


def test_read_multinli_table_gives_labels_attribute_groups_and_tokens(tmp_path, tokenizer):
    df = fake_rows()
    splits = multinli.read_multinli(write_table(tmp_path / "mnli", df), tokenizer, max_length=24)
    truth = df.set_index("pairID")
    assert set(splits) == {"train", "val", "test"}
    for split, ds in splits.items():
        assert ds.group_counts().tolist() == list(FAKE_COUNTS[split])
        assert ds.n_classes == 3 and ds.n_attrs == 2 and ds.group_names == multinli.MULTINLI_GROUP_NAMES
        assert ds.y.tolist() == truth.loc[ds.ids, "y"].tolist()
        assert ds.a.tolist() == truth.loc[ds.ids, "a"].tolist()
        assert torch.equal(ds.g, 2 * ds.y + ds.a)
        assert ds.texts["hypothesis"].tolist() == truth.loc[ds.ids, "hypothesis"].tolist()
        # (N, 2, L): input ids of the pair, token types 0 then 1, padding 0 in both rows
        assert ds.x.dtype == torch.long and ds.x.shape[:2] == (len(ds), 2) and ds.x.shape[2] <= 24
        for i in (0, len(ds) - 1):
            enc = tokenizer(ds.texts["premise"].iat[i], ds.texts["hypothesis"].iat[i])
            n = len(enc["input_ids"])
            assert ds.x[i, 0, :n].tolist() == enc["input_ids"]
            assert ds.x[i, 1, :n].tolist() == enc["token_type_ids"]
            assert (ds.x[i, :, n:] == 0).all() and ds.pad_id == 0
    # the .tsv variant reads the same
    tsv = multinli.read_multinli(write_table(tmp_path / "tsv", df, "multinli.tsv"), tokenizer, 24)
    assert all(torch.equal(tsv[s].x, splits[s].x) for s in splits)
    # truncation to max_length
    short = multinli.read_multinli(tmp_path / "mnli", tokenizer, max_length=8)
    assert short["train"].x.shape[2] == 8
    # example table for notebooks
    table = synthetic_text.decode_pairs(splits, n_per_group=1)
    assert list(table.columns) == ["split", "group_name", "premise", "hypothesis"]
    assert len(table) == 18 and multinli.negation_attribute(table["hypothesis"]).tolist() == [0, 1] * 9


def group_dro_layout(root, seed=0, swap_dev=False):
    """MultiNLI 1.0 jsonl files and a metadata_random.csv made the way group_DRO's
    generate_multinli.py makes it: the three files concatenated with one running row
    number, '-' rows dropped (numbers kept), labels coded contradiction 0, entailment 1,
    neutral 2, negation from the hypothesis, the frame written with its index."""
    rng = np.random.default_rng(seed)
    files = {"multinli_1.0_train": [], "multinli_1.0_dev_matched": [], "multinli_1.0_dev_mismatched": []}
    plan = []                                     # (file, record, split or None)
    for split, cs in FAKE_COUNTS.items():
        for g, c in enumerate(cs):
            y, a = divmod(g, 2)
            for i in range(c):
                hyp = (NEG_HYPS if a else POS_HYPS)[i % 4]
                rec = {"gold_label": multinli.MULTINLI_LABELS[y], "sentence1": f"a woman {split} {g} {i}",
                       "sentence2": hyp, "pairID": f"{split}-{g}-{i}", "genre": "fiction"}
                plan.append((str(rng.choice(list(files))), rec, split))
    for k in range(5):                            # no-consensus rows, counted then dropped
        plan.append(("multinli_1.0_dev_matched", {"gold_label": "-", "sentence1": f"odd {k}",
                                                  "sentence2": "no idea", "pairID": f"x{k}"}, None))
    plan = [plan[i] for i in rng.permutation(len(plan))]
    for f, rec, split in plan:
        files[f].append((rec, split))
    rows, meta = 0, []
    for f, recs in files.items():
        for rec, split in recs:
            if split is not None:
                meta.append({"row": rows, "gold_label": multinli.MULTINLI_LABELS.index(rec["gold_label"]),
                             "sentence2_has_negation": int(multinli.negation_attribute([rec["sentence2"]])[0]),
                             "split": {"train": 0, "val": 1, "test": 2}[split]})
            rows += 1
    order = list(files)
    if swap_dev:
        order[1], order[2] = order[2], order[1]
    (root / "multinli_1.0").mkdir(parents=True)
    for name, f in zip(order, files):
        with open(root / "multinli_1.0" / f"{name}.jsonl", "w") as fh:
            for rec, _ in files[f]:
                fh.write(json.dumps(rec) + "\n")
    pd.DataFrame(meta).set_index("row").rename_axis(None).to_csv(root / "metadata_random.csv")
    return root


def test_read_multinli_from_the_multinli_files_and_group_dros_metadata(tmp_path, tokenizer):
    root = group_dro_layout(tmp_path / "gdro")
    splits = multinli.read_multinli(root, tokenizer)
    for split, ds in splits.items():
        assert ds.group_counts().tolist() == list(FAKE_COUNTS[split])
        for pid, y, a in zip(ds.ids, ds.y.tolist(), ds.a.tolist()):
            s, g, _ = pid.split("-")
            assert s == split and int(g) == 2 * y + a
    bad = group_dro_layout(tmp_path / "swapped", swap_dev=True)
    with pytest.raises(ValueError, match="does not match the MultiNLI files"):
        multinli.read_multinli(bad, tokenizer)


def test_read_multinli_bad_input_gives_clear_errors(tmp_path, tokenizer):
    df = fake_rows()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        multinli.read_multinli(tmp_path / "nowhere", tokenizer)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="multinli.csv"):
        multinli.read_multinli(tmp_path / "empty", tokenizer)
    both = write_table(write_table(tmp_path / "both", df), df, "multinli.tsv")
    with pytest.raises(ValueError, match="keep one"):
        multinli.read_multinli(both, tokenizer)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['gold_label'\]"):
        multinli.read_multinli(write_table(tmp_path / "col", df.drop(columns="gold_label")), tokenizer)
    unk = df.copy()
    unk.loc[3, "gold_label"] = "-"
    with pytest.raises(ValueError, match=r"unknown gold label.*'-'.*drop them"):
        multinli.read_multinli(write_table(tmp_path / "unk", unk), tokenizer)
    gone = df[~((df["split"].astype(str).isin(["val", "1"])) & (df["y"] == 1) & (df["a"] == 1))]
    with pytest.raises(ValueError, match=r"split 'val' has empty group\(s\) \['entailment, negation'\]"):
        multinli.read_multinli(write_table(tmp_path / "grp", gone), tokenizer)
    twice = pd.concat([df, df.iloc[[0]]], ignore_index=True)
    with pytest.raises(ValueError, match="more than once within a split"):
        multinli.read_multinli(write_table(tmp_path / "dup", twice), tokenizer)
    leak = df.copy()
    i = leak.index[leak["split"].astype(str).isin(["test", "2"])][0]
    j = leak.index[leak["split"].astype(str).isin(["train", "0"])][0]
    leak.loc[i, ["premise", "hypothesis"]] = leak.loc[j, ["premise", "hypothesis"]].to_numpy()
    with pytest.raises(ValueError, match="more than one split.*leaks"):
        multinli.read_multinli(write_table(tmp_path / "leak", leak), tokenizer)
    # duplicates="drop" keeps the first occurrence (train before test)
    kept = multinli.read_multinli(tmp_path / "leak", tokenizer, duplicates="drop")
    assert len(kept["test"]) == sum(FAKE_COUNTS["test"]) - 1
    assert len(kept["train"]) == sum(FAKE_COUNTS["train"])
    (tmp_path / "latin").mkdir()
    raw = "premise,hypothesis,gold_label,split\ncaf\xe9 ok,no,neutral,train\n".encode("latin-1")
    (tmp_path / "latin" / "multinli.csv").write_bytes(raw)
    with pytest.raises(ValueError, match="not UTF-8"):
        multinli.read_multinli(tmp_path / "latin", tokenizer)


# --------------------------------------------------------------------------- local models


def test_tiny_bert_saved_and_loaded_locally_gives_identical_logits(tmp_path, tokenizer_dir, tokenizer):
    cfg = tiny_cfg(vocab_size=len(tokenizer))
    x = multinli.tokenize_pairs(tokenizer, ["the cat sat on the mat", "a man ran"],
                            ["the cat is here", "nobody ran ."])
    teacher = text_models.build_text_teacher(cfg, 3, seed=1).eval()
    teacher.encoder.save_pretrained(tmp_path / "teacher")
    loaded = text_models.load_text_teacher(tmp_path / "teacher", 3, seed=5).eval()
    loaded.classifier.load_state_dict(teacher.classifier.state_dict())
    assert torch.equal(loaded(x), teacher(x)) and loaded(x).shape == (2, 3)
    student = text_models.build_text_student(cfg, 3, exit_layer=2, seed=1).eval()
    student.encoder.save_pretrained(tmp_path / "student")
    back = text_models.load_text_student(tmp_path / "student", 3, exit_layer=2, seed=5).eval()
    back.load_state_dict(student.state_dict())          # same architecture, strict
    a, b = student(x), back(x)
    assert isinstance(b, StudentOutput) and all(torch.equal(u, v) for u, v in zip(a, b))
    assert back.encoder.pooler is None and back.exit.in_features == 16
    assert text_models.load_text_teacher(tmp_path / "teacher", 3, dropout=0.25).dropout.p == 0.25
    # and the tokenizer round trip
    assert text_models.load_tokenizer(tokenizer_dir)("no cat")["input_ids"] == tokenizer("no cat")["input_ids"]
    # seeded builds: same seed, same weights; the global RNG is left alone
    state = torch.get_rng_state()
    t1, t2 = text_models.build_text_teacher(cfg, 3, seed=7), text_models.build_text_teacher(cfg, 3, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(t1.parameters(), t2.parameters()))
    # errors: missing folder, a folder that is no model, a config without weights
    with pytest.raises(FileNotFoundError, match="does not exist.*nothing is downloaded"):
        text_models.load_text_teacher(tmp_path / "absent", 3)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a Hugging Face model folder"):
        text_models.load_text_student(tmp_path / "junk", 3, 1)
    with pytest.raises(ValueError, match="not a tokenizer folder"):
        text_models.load_tokenizer(tmp_path / "junk")
    (tmp_path / "teacher" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="could not load a model"):
        text_models.load_text_teacher(tmp_path / "teacher", 3)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_student_exit_reads_the_chosen_layer_and_is_detached(pool, tokenizer):
    cfg = tiny_cfg(vocab_size=len(tokenizer))
    x = multinli.tokenize_pairs(tokenizer, ["the cat sat on the mat here", "a man ran"],
                            ["the cat is here", "nobody ran ."])
    mask = (x[:, 0] != 0)
    assert not mask.all()                          # padding present: the mean must skip it
    for layer in (1, 2, 3):
        student = text_models.build_text_student(cfg, 3, exit_layer=layer, seed=0, pool=pool).eval()
        out = student(x)
        hs = student.encoder(input_ids=x[:, 0], token_type_ids=x[:, 1], attention_mask=mask.long(),
                             output_hidden_states=True).hidden_states
        h = hs[layer]
        want = h[:, 0] if pool == "cls" else (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        torch.testing.assert_close(out.phi, want)
        torch.testing.assert_close(out.exit_logits, student.exit(want))
        torch.testing.assert_close(out.logits, student.classifier(hs[-1][:, 0]))
        for other in {0, 1, 2, 3} - {layer}:                   # no other layer's state
            assert not torch.allclose(out.phi, hs[other][:, 0] if pool == "cls" else hs[other].mean(1))
    y = torch.tensor([0, 2])
    for detach in (True, False):
        student = text_models.build_text_student(cfg, 3, exit_layer=2, seed=0, pool=pool,
                                          detach_exit=detach).train()
        F.cross_entropy(student(x).exit_logits, y).backward()
        enc_grads = [p.grad for p in student.encoder.parameters()]
        assert student.exit.linear.weight.grad is not None
        if detach:
            assert all(g is None for g in enc_grads)           # no gradient reaches the encoder
        else:
            assert any(g is not None and g.abs().sum() > 0 for g in enc_grads)
    with pytest.raises(ValueError, match=r"exit_layer=4 .* layers 1\.\.3; set the profile's exit_layer"):
        text_models.build_text_student(cfg, 3, exit_layer=4)
    with pytest.raises(ValueError, match="exit_layer=0"):
        text_models.build_text_student(cfg, 3, exit_layer=0)
    with pytest.raises(ValueError, match="pool='max'"):
        text_models.build_text_student(cfg, 3, exit_layer=1, pool="max")
    with pytest.raises(ValueError, match=r"\(N, 2, L\)"):
        student(x[:, 0])


def test_import_without_transformers_works():
    code = ("import sys; sys.modules['transformers'] = None\n"
            "from fairkd_utils import multinli, synthetic_text, text_models\n"
            "assert multinli.negation_attribute(['No way']).tolist() == [1]\n"
            "assert len(synthetic_text.make_synthetic_text(scale=0.01)['train']) > 0\n"
            "assert 'transformers' not in [m for m in sys.modules if sys.modules[m] is not None]\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- miniature


@pytest.fixture(scope="module")
def synth():
    return synthetic_text.make_synthetic_text(scale=0.5, seed=3)


def synthetic_text_rule(premise, hypothesis, vocab):
    """The miniature's label of one pair, recomputed from its ids independently of the
    generator (specials, padding and negation words are ignored): **contradiction** (0)
    when a hypothesis word is the antonym of a premise word; else **neutral** (2) when a
    hypothesis word is not in the premise; else **entailment** (1: every hypothesis word
    is in the premise). ``None`` when the hypothesis holds a vague word (``VAGUE_WORDS``):
    the pair does not decide its label (``ambiguous_rate`` of ``make_synthetic_text``)."""
    p = np.asarray(premise)
    h = np.asarray(hypothesis)
    if ((h >= vocab.first_vague) & (h < vocab.size)).any():
        return None
    p = set(p[(p >= vocab.first_content) & (p < vocab.first_vague)].tolist())
    h = h[h >= vocab.first_content]
    if any(int(w) in p for w in vocab.antonym(h)):
        return 0
    if any(int(w) not in p for w in h):
        return 2
    return 1


def _split_pair(ds, i):
    ids, types = ds.x[i, 0], ds.x[i, 1]
    return ids[(types == 0) & (ids > 4)].numpy(), ids[(types == 1) & (ids > 4)].numpy()


def test_synthetic_text_label_is_the_rule_on_every_item(synth):
    vocab = synthetic_text.synthetic_text_vocab()
    corpus = synthetic_text.make_text_pretraining_corpus(n_per_group=300, seed=1)
    for ds in [*synth.values(), corpus]:
        labels = [synthetic_text_rule(*_split_pair(ds, i), vocab) for i in range(len(ds))]
        assert labels == ds.y.tolist()
        neg = ((ds.x[:, 0] >= vocab.first_negation) & (ds.x[:, 0] < vocab.first_content)).sum(1)
        assert torch.equal(neg, ds.a)                     # one negation word iff a = 1
    ds = synth["train"]
    assert ds.x.shape == (len(ds), 2, synthetic_text.synthetic_text_length()) and ds.x.shape[2] <= 32
    assert (ds.x[:, 0, 0] == synthetic_text.CLS).all() and int(ds.x[:, 0].max()) < vocab.size
    assert ((ds.x[:, 0] == synthetic_text.SEP).sum(1) == 2).all()
    assert (ds.x[:, 1][ds.x[:, 0] == synthetic_text.PAD] == 0).all()
    # the decoded table reads as words, and its hypotheses give back the attribute
    table = synthetic_text.decode_pairs(ds, n_per_group=3)
    assert len(table) == 18 and table["group_name"].tolist()[::3] == multinli.MULTINLI_GROUP_NAMES
    full = synthetic_text.decode_pairs(ds, n_per_group=len(ds))
    assert len(full) == len(ds)
    assert (multinli.negation_attribute(full["hypothesis"]) == full["group_name"].str.endswith(", negation")).all()
    # the knobs are checked: a neutral word needs a pair outside the longest premise
    with pytest.raises(ValueError, match="n_pairs=5 is too small"):
        synthetic_text.make_synthetic_text(n_pairs=5)


def test_synthetic_text_pairs_are_distinct_within_and_across_splits(synth):
    rows = torch.cat([ds.x[:, 0] for ds in synth.values()])
    assert len(torch.unique(rows, dim=0)) == len(rows)
    corpus = synthetic_text.make_text_pretraining_corpus(n_per_group=400, seed=0, exclude=synth)
    both = torch.cat([rows, corpus.x[:, 0]])
    assert len(torch.unique(both, dim=0)) == len(both)
    with pytest.raises(ValueError, match="could not draw"):
        synthetic_text.make_text_pretraining_corpus(n_per_group=500, n_pairs=4, premise_len=(3, 3))


def test_synthetic_text_is_deterministic_per_seed(synth):
    again = synthetic_text.make_synthetic_text(scale=0.5, seed=3)
    other = synthetic_text.make_synthetic_text(scale=0.5, seed=4)
    for split, ds in synth.items():
        assert torch.equal(ds.x, again[split].x) and torch.equal(ds.y, again[split].y)
        assert torch.equal(ds.a, again[split].a) and ds.ids == again[split].ids
        assert not torch.equal(ds.x, other[split].x)
    c1 = synthetic_text.make_text_pretraining_corpus(n_per_group=50, seed=0)
    assert torch.equal(c1.x, synthetic_text.make_text_pretraining_corpus(n_per_group=50, seed=0).x)


def test_synthetic_text_group_proportions_are_multinlis(synth):
    for scale in (0.5, 1.0):
        for split, counts in multinli.MULTINLI_COUNTS.items():
            want = [max(1, round(c * scale / synthetic_text.SYNTHETIC_TEXT_DIVISOR)) for c in counts]
            assert synthetic_text.synthetic_text_counts(split, scale) == want
    for split, ds in synth.items():
        got = ds.group_counts().numpy()
        target = np.array(multinli.MULTINLI_COUNTS[split]) / sum(multinli.MULTINLI_COUNTS[split])
        # each group within rounding (half a pair per group) of MultiNLI's share
        assert np.all(np.abs(got - target * len(ds)) <= 0.5 + 6 * 0.5)
        assert np.all(np.abs(got / len(ds) - target) < 0.01)
    train = synth["train"].group_counts().numpy()
    neg_rate = train[1::2] / (train[0::2] + train[1::2])          # per class
    assert neg_rate[0] > 5 * neg_rate[1] and neg_rate[0] > 4 * neg_rate[2]
    val = synth["val"].group_counts().numpy()
    assert val[3] < val[2] / 10                                  # val is not group-balanced
    # spurious_strength: P(contradiction | negation) in train; class sizes kept
    full = np.array(multinli.MULTINLI_COUNTS["train"])
    multinlis = full[1] / full[1::2].sum()                       # 11158 / 14671
    assert synthetic_text.synthetic_text_counts("train", 20, multinlis) == full.tolist()
    for s in (1 / 3, 0.95):
        c = np.array(synthetic_text.synthetic_text_counts("train", 20, s))
        assert np.array_equal(c[0::2] + c[1::2], full[0::2] + full[1::2])
        assert abs(c[1] / c[1::2].sum() - s) < 1e-3
    with pytest.raises(ValueError, match="spurious_strength"):
        synthetic_text.make_synthetic_text(spurious_strength=1.0)


def test_synthetic_text_zipf_lexicon_draws_pairs_by_the_law_and_keeps_the_rule():
    n_pairs, z = 24, 1.0
    w = synthetic_text.synthetic_text_word_weights(n_pairs, z)
    k = np.arange(1, n_pairs + 1)
    assert np.allclose(w, k ** -z / (k ** -z).sum())               # dense formula
    assert synthetic_text.synthetic_text_word_weights(n_pairs, 0) is None   # 0: uniform, today's stream
    with pytest.raises(ValueError, match="word_zipf must be >= 0"):
        synthetic_text.synthetic_text_word_weights(n_pairs, -1)
    vocab = synthetic_text.synthetic_text_vocab(n_pairs)
    splits = synthetic_text.make_synthetic_text(scale=0.5, n_pairs=n_pairs, word_zipf=z)
    ds = splits["train"]
    assert [synthetic_text_rule(*_split_pair(ds, i), vocab) for i in range(len(ds))] == ds.y.tolist()
    # premise words are drawn by the law (without replacement within a premise): the most
    # frequent pair is in far more premises than the rarest, in the order of the weights
    per_pair = _premise_words_per_pair(ds, vocab)
    assert per_pair[0] > 5 * per_pair[-1] > 0
    assert np.corrcoef(np.log(per_pair), np.log(w))[0, 1] > 0.95
    uniform = synthetic_text.make_synthetic_text(scale=0.5, n_pairs=n_pairs)["train"]
    per_pair = _premise_words_per_pair(uniform, vocab)
    assert per_pair.max() < 1.5 * per_pair.min()
    # the pretraining corpus takes the same lexicon
    corpus = synthetic_text.make_text_pretraining_corpus(n_per_group=200, n_pairs=n_pairs, word_zipf=z)
    per_pair = _premise_words_per_pair(corpus, vocab)
    assert per_pair[0] > 5 * per_pair[-1]


def _premise_words_per_pair(ds, vocab):
    """How many premise words of ``ds`` come from each antonym pair of ``vocab``."""
    words = ds.x[:, 0][(ds.x[:, 1] == 0) & (ds.x[:, 0] >= vocab.first_content)]
    return np.bincount(((words - vocab.first_content) // 2).numpy(), minlength=vocab.n_pairs)


def test_ambiguous_pairs_are_a_share_of_every_group_and_the_rest_keep_the_rule():
    vocab = synthetic_text.synthetic_text_vocab(16, n_vague=len(synthetic_text.VAGUE_WORDS))
    splits = synthetic_text.make_synthetic_text(scale=0.5, n_pairs=16, ambiguous_rate=0.2)
    assert splits["train"].vocab == vocab.tokens()
    for ds in splits.values():
        rule = [synthetic_text_rule(*_split_pair(ds, i), vocab) for i in range(len(ds))]
        vague = np.array([r is None for r in rule])
        hyp = ds.x[:, 0] * (ds.x[:, 1] == 1)
        has_vague = ((hyp >= vocab.first_vague) & (hyp < vocab.size)).any(1).numpy()
        assert np.array_equal(vague, has_vague)               # ambiguous iff a vague word
        assert all(r == y for r, y in zip(rule, ds.y.tolist()) if r is not None)
        g = ds.g.numpy()
        for grp in range(6):                                  # ~0.2 of every group, alike
            n = (g == grp).sum()
            assert abs(vague[g == grp].mean() - 0.2) < 3 * np.sqrt(0.2 * 0.8 / n) + 0.02
    assert vocab.tokens()[-4:] == list(synthetic_text.VAGUE_WORDS)
    plain = synthetic_text.make_synthetic_text(scale=0.5, n_pairs=16)["train"]
    assert plain.vocab == synthetic_text.synthetic_text_vocab(16).tokens()  # no vague words: ids as before
    assert all(synthetic_text_rule(*_split_pair(plain, i), vocab) is not None for i in range(len(plain)))
    with pytest.raises(ValueError, match="ambiguous_rate must be in"):
        synthetic_text.make_synthetic_text(ambiguous_rate=1.0)


def test_neutral_knobs_draw_exactly_the_data_of_the_first_text_reference_run():
    """The generator's own defaults (8 antonym pairs, word_zipf 0, ambiguous_rate 0) draw
    the data of the first text reference run bit for bit: a hash of the tensors drawn
    before those knobs existed (the calibrated `default` profile sets them otherwise)."""
    import hashlib

    splits = synthetic_text.make_synthetic_text(scale=0.05, seed=0)
    corpus = synthetic_text.make_text_pretraining_corpus(n_per_group=30, seed=0)
    h = hashlib.sha256()
    for ds in [*splits.values(), corpus]:
        for t in (ds.x, ds.y, ds.a):
            h.update(t.numpy().tobytes())
    assert h.hexdigest()[:16] == "1e50ee173d3518e4"
    assert len(splits["train"].vocab) == 25


def test_pretraining_corpus_negation_is_independent_of_the_label():
    corpus = synthetic_text.make_text_pretraining_corpus(n_per_group=40, seed=2)
    counts = corpus.group_counts().view(3, 2)
    assert (counts == 40).all() and corpus.split == "pretrain"
    p_neg = counts[:, 1] / counts.sum(1)
    assert torch.equal(p_neg, torch.full((3,), 0.5))              # P(a=1 | y) the same for every y


def test_text_student_and_teacher_train_in_the_study_loop():
    from fairkd_utils import train

    splits = synthetic_text.make_synthetic_text(scale=0.02, seed=0)
    cfg = text_models.bert_config(synthetic_text.synthetic_text_vocab().size, hidden_size=16, num_layers=2,
                           num_heads=2, max_length=splits["train"].x.shape[2])
    conf = train.TrainConfig(epochs=1, batch_size=64, optimizer="adamw", lr=1e-3, progress=False)
    for model in (text_models.build_text_student(cfg, 3, 1, seed=0), text_models.build_text_teacher(cfg, 3, seed=0)):
        result = train.train_model(model, splits, conf)
        assert len(result.history) == 1 and math.isfinite(result.history["train_loss"].iat[0])
        p = train.predict(result.model, splits["test"])
        assert p.logits.shape == (len(splits["test"]), 3)
        if isinstance(model, text_models.TextEarlyExitStudent):
            assert p.phi.shape == (len(splits["test"]), 16)


# --------------------------------------------------------------------------- exit Laplace, C = 3


class AppendOne(nn.Module):
    def forward(self, x):
        return phi_tilde(x)


def test_three_class_exit_laplace_matches_laplace_torch_on_a_text_students_exit():
    laplace = pytest.importorskip("laplace")
    from fairkd_utils import train

    ds = synthetic_text.make_synthetic_text(scale=0.03, seed=1)["train"]
    cfg = tiny_cfg(vocab_size=synthetic_text.synthetic_text_vocab().size, layers=2,
                   max_length=ds.x.shape[2])
    # mean pooling: at random initialisation the [CLS] state hardly varies between pairs
    student = text_models.build_text_student(cfg, 3, exit_layer=1, seed=0, pool="mean")
    p = train.predict(student, ds)
    phi, y = p.phi.double(), ds.y
    assert phi.shape == (len(ds), student.exit.in_features)
    head = ExitHead(student.exit.in_features, 3).double()
    head.load_state_dict(student.exit.state_dict())
    opt = torch.optim.LBFGS(head.parameters(), max_iter=50)   # a trained exit: non-trivial MAP

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(phi), y) + 1e-3 * head.linear.weight.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        probs = torch.softmax(head(phi), -1)
    entropy = -(probs * probs.log()).sum(1)
    assert float(entropy.mean()) < math.log(3) - 0.02 and float(entropy.min()) > 0.05

    model = nn.Sequential(AppendOne(), nn.Linear(student.exit.in_features + 1, 3, bias=False)).double()
    model[1].weight.data.copy_(head.linear.weight.data)
    la = laplace.Laplace(model, "classification", subset_of_weights="last_layer",
                         hessian_structure="kron", last_layer_name="1")
    la.fit(DataLoader(TensorDataset(phi, y), batch_size=64))

    ours = fit_exit_laplace(head, phi, y=y)                    # exact prior, tau by marglik
    B, A = la.H_facs.kfacs[0]
    assert B.shape == (3, 3)
    torch.testing.assert_close(ours.factors.B, B, rtol=0, atol=1e-9)
    torch.testing.assert_close(ours.factors.A, A, rtol=0, atol=1e-11)
    for tau in (0.1, 1.0, 10.0):
        lml = float(la.log_marginal_likelihood(torch.tensor([tau], dtype=torch.float64)))
        assert math.isclose(ours.log_marginal_likelihood(tau), lml, rel_tol=1e-9)
    # the predictive at a common tau: the logit covariance (GLM) and the MC probabilities
    tau = 0.5
    la.prior_precision = tau
    fixed = ExitLaplace(head.linear.weight, ours.factors, tau=tau)
    f_mu, f_var = la._glm_predictive_distribution(phi[:60])
    mu, cov = fixed.logit_mean_cov(phi[:60])
    assert (mu - f_mu).abs().max() < 1e-10 and (cov - f_var).abs().max() < 1e-8
    assert float(cov.diagonal(dim1=1, dim2=2).mean()) > 1e-3        # the test has teeth
    S = 2000
    p_lt = la(phi[:60], pred_type="glm", link_approx="mc", n_samples=S,
              generator=torch.Generator().manual_seed(1))
    p_ours = fixed.predict(phi[:60], link="mc", n_samples=S,
                           generator=torch.Generator().manual_seed(2)).probs
    assert (p_ours - p_lt).abs().max() < 4 * math.sqrt(2) * 0.5 / math.sqrt(S)


# --------------------------------------------------------------------------- pretrained student


def test_every_student_seed_starts_from_the_one_pretrained_encoder_and_a_rerun_reuses_it(tmp_path):
    from fairkd_utils import build, rundir

    overrides = {"student_pretrain_per_pair": 20, "student_pretrain_epochs": 1, "data_scale": 0.02,
                 "text_antonym_pairs": 12, "text_word_zipf": 1.0}
    run = rundir.setup(tmp_path / "run", tmp_path / "fig", "smoke", "synthetic_text", None, [0, 1],
                       "cpu", profile_overrides=overrides)
    encoder = build.pretrained_student_encoder(run)
    a, b = build.build_student(run, 0), build.build_student(run, 1)
    for model in (a, b):                                 # the encoder is the pretrained one ...
        for k, v in model.encoder.state_dict().items():
            assert torch.equal(v, encoder[k]), k
    scratch = build._tiny_student(run, 0)                # ... which pretraining has changed
    assert not torch.equal(scratch.encoder.embeddings.word_embeddings.weight,
                           encoder["embeddings.word_embeddings.weight"])
    assert not torch.equal(a.classifier.weight, b.classifier.weight)   # the seed draws the heads
    assert not torch.equal(a.exit.linear.weight, b.exit.linear.weight)
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("student-pretrained*"))
    assert len(ckpts) == 1
    # a new process (a fresh Run) reuses the checkpoint: same weights, nothing trained
    again = rundir.setup(tmp_path / "run", tmp_path / "fig", "smoke", "synthetic_text", None, [0, 1],
                         "cpu", profile_overrides=overrides)
    mtime = ckpts[0].stat().st_mtime_ns
    for k, v in build.pretrained_student_encoder(again).items():
        assert torch.equal(v, encoder[k])
    assert ckpts[0].stat().st_mtime_ns == mtime
    assert a.pool == "cls"                               # the profile's exit_pool reaches the model
    pooled = rundir.setup(tmp_path / "pooled", tmp_path / "fig", "smoke", "synthetic_text", None, [0],
                          "cpu", profile_overrides={"data_scale": 0.02, "exit_pool": "mean"})
    assert build.build_student(pooled, 0).pool == "mean"
    # no pretraining: a plain random encoder, different per seed
    plain = rundir.setup(tmp_path / "plain", tmp_path / "fig", "smoke", "synthetic_text", None, [0],
                         "cpu", profile_overrides={"data_scale": 0.02})
    assert build.pretrained_student_encoder(plain) is None
    assert not torch.equal(build.build_student(plain, 0).encoder.embeddings.word_embeddings.weight,
                           build.build_student(plain, 1).encoder.embeddings.word_embeddings.weight)
    bad = rundir.setup(tmp_path / "bad", tmp_path / "fig", "smoke", "synthetic_text", None, [0], "cpu",
                       profile_overrides={"student_pretrain_per_pair": 20, "student_pretrain_epochs": 0})
    with pytest.raises(ValueError, match="student_pretrain_epochs=0"):
        build.build_student(bad, 0)
