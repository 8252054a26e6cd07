"""Smoke tests of the paper experiments on the bundled digits data (small MLPs, 1 epoch, 1 seed)."""

import csv

import pytest
import torch

from hetfuse.data import alignment_samples, load_dataset
from hetfuse.errors import HetfuseError
from hetfuse.experiments import parse_seeds, run_ablation, run_skill_transfer
from hetfuse.experiments.ablation import fuse_with_mapping
from hetfuse import prepare_fusion
from hetfuse.config import FusionConfig
from hetfuse.models import MLP
from hetfuse.train import predict_logits


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _read(path):
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


def test_parse_seeds():
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds("0,2,3") == [0, 2, 3]
    assert parse_seeds("0-2,7, 1") == [0, 1, 2, 7]
    assert parse_seeds("5") == [5]
    for bad in ("", "a", "3-1", "1-", "-1"):
        with pytest.raises(HetfuseError):
            parse_seeds(bad)


def test_skill_transfer_smoke(digits, tmp_path):
    out = tmp_path / "st"
    command = "hetfuse experiment skill-transfer --seeds 0 --epochs 1 --out st"
    rows = run_skill_transfer(seeds=[0], out_dir=out, epochs=1, samples=50, progress=False, dataset=digits,
                              hidden_a=[24, 16], hidden_b=[24, 20, 12], cache=tmp_path / "cache", command=command)
    cols, csv_rows = _read(out / "results.csv")
    assert cols == ["seed", "balance", "repair", "wb", "acc_a", "acc_b", "acc_fused", "acc_ensemble", "mapping"]
    assert len(rows) == len(csv_rows) == 2 * 2 * 11  # balance × repair × wB
    for name in ("summary.md", "fig4.png", "command.txt"):
        assert (out / name).is_file()
    recorded = (out / "command.txt").read_text().splitlines()
    assert recorded[0] == command and recorded[1].startswith("# hetfuse ")
    assert f"Command: `{command}`" in (out / "summary.md").read_text()
    # wB = 0 without repair is model A itself (target A, identity layers after ReLUs): exact.
    for balance in ("add", "merge"):
        r = next(r for r in rows if r["balance"] == balance and not r["repair"] and r["wb"] == 0.0)
        assert r["acc_fused"] == r["acc_a"]
        assert r["acc_ensemble"] == r["acc_a"]
    r1 = next(r for r in rows if r["balance"] == "add" and not r["repair"] and r["wb"] == 1.0)
    assert r1["acc_ensemble"] == r1["acc_b"]
    assert {r["mapping"] for r in rows} <= {"[1,3]"}  # neurons + both constraints: 24→24, 16→12 (12 is closest)
    # the checkpoint cache is used on a rerun and gives the same numbers
    rows2 = run_skill_transfer(seeds=[0], out_dir=tmp_path / "st2", epochs=1, samples=50, progress=False,
                               dataset=digits, hidden_a=[24, 16], hidden_b=[24, 20, 12], cache=tmp_path / "cache")
    assert [r["acc_fused"] for r in rows2] == [r["acc_fused"] for r in rows]


def test_ablation_smoke(digits, tmp_path):
    out = tmp_path / "ab"
    rows = run_ablation(seeds=[0], out_dir=out, epochs=1, samples=50, progress=False, dataset=digits,
                        hidden_a=[24, 20, 16, 12, 8], hidden_b={1: [24, 16], 2: [24, 20, 16]},
                        cache=tmp_path / "cache")
    cols, csv_rows = _read(out / "results.csv")
    assert cols == ["seed", "pair", "mapping", "balance", "repair", "acc_a", "acc_b", "acc_fused"]
    assert len(rows) == len(csv_rows) == 2 * 10 * 2 * 2  # pairs × mappings × balance × repair
    mcols, mrows = _read(out / "mappings.csv")
    assert mcols == ["seed", "pair", "representation", "constraint", "mapping"]
    assert len(mrows) == 2 * 3 * 4
    # constraints are honoured (1-based)
    for r in mrows:
        a = [int(v) for v in r["mapping"].strip("[]").split(",")]
        assert a == sorted(set(a)) and len(a) == (2 if r["pair"] == "1" else 3)
        if r["constraint"] in ("both", "first"):
            assert a[0] == 1
        if r["constraint"] in ("both", "last"):
            assert a[-1] == 5
    assert len({r["mapping"] for r in rows if r["pair"] == 1}) == 10
    for name in ("summary.md", "command.txt"):
        assert (out / name).is_file()


@pytest.mark.parametrize("balance", ["add", "merge"])
def test_forced_mapping_matches_pipeline(digits, balance):
    """Forcing the mapping CLA would pick gives the same fused model as the pipeline itself."""
    torch.manual_seed(0)
    deep = MLP(64, [24, 20, 16, 12, 8], 10, bias=False).eval()
    torch.manual_seed(1)
    shallow = MLP(64, [24, 16], 10, bias=False).eval()
    x = alignment_samples(digits.x_train, 60, seed=0)
    config = FusionConfig(weights=[0.5, 0.5], target=1, representation="neurons", balance=balance,
                          samples=60, repair=False, seed=0)
    prepared = prepare_fusion([deep, shallow], x, config)
    mapping = next(m["alignment"] for m in prepared.report["mappings"] if m["changed"])
    forced = fuse_with_mapping(deep, shallow, mapping, x, balance=balance, samples=60, seed=0)
    a = predict_logits(prepared.combine([0.5, 0.5], repair=False), digits.x_test)
    b = predict_logits(forced.combine([0.5, 0.5], repair=False), digits.x_test)
    assert torch.allclose(a, b, atol=1e-5)


def test_multi_model_smoke(digits, tmp_path):
    from hetfuse.experiments import run_multi_model
    from hetfuse.experiments.multi_model import group_split

    idx = group_split(digits.y_train, (0, 1), seed=0)
    labels = digits.y_train[idx]
    assert int((labels == 0).sum()) == int((digits.y_train == 0).sum())
    assert int((labels == 5).sum()) == round(0.1 * int((digits.y_train == 5).sum()))
    rows = run_multi_model(seeds=[0], out_dir=tmp_path / "mm", epochs=1, samples=50, progress=False,
                           cache=tmp_path / "cache", dataset=digits, hidden=((16,), (16, 12), (16, 12, 8)))
    fields, written = _read(tmp_path / "mm" / "results.csv")
    # 2 settings x (1 triple + 3 pairs) x 2 balances x 2 repair
    assert len(rows) == len(written) == 32 and "acc_fused" in fields
    assert {r["models"] for r in written} == {"0+1+2", "0+1", "0+2", "1+2"}
    assert "Setting `split`" in (tmp_path / "mm" / "summary.md").read_text()


def test_cifar_oneshot_smoke(tmp_path):
    from hetfuse.data import Dataset
    from hetfuse.experiments import run_cifar_oneshot

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        y = torch.arange(60) % 10
        x = torch.randn(60, 3, 32, 32, generator=g) + y.view(-1, 1, 1, 1) * 0.3
        ds = Dataset(name="fake", x_train=x, y_train=y, x_test=x[:20], y_test=y[:20], num_classes=10,
                     input_shape=(3, 32, 32))
        rows = run_cifar_oneshot(setup="resnet", out_dir=tmp_path / "c", epochs=1, samples=16, progress=False,
                                 cache=tmp_path / "cache", dataset=ds,
                                 specs=("resnet20:w=0.25", "resnet20:w=0.25"), wbs=(0.0, 0.5))
    finally:
        torch.set_num_threads(n)
    assert len(rows) == 2 and (tmp_path / "c" / "summary.md").is_file()
    # wB = 0 without repair is model A itself; equal widths make vanilla averaging defined
    assert rows[0]["acc_fused"] == rows[0]["acc_a"] and rows[0]["acc_vanilla"] == rows[0]["acc_a"]
    assert isinstance(rows[0]["acc_vanilla_repair"], float)


def test_class_split_smoke(digits, tmp_path):
    from hetfuse.experiments.class_split import MNIST_RECIPE, Method, Setting, run_class_split

    setting = Setting("mnist", "digits", {"a": "mlp:24,24", "b": "mlp:24,24,24", "wide": "mlp:32,32,32"},
                      [([0, 1, 2, 3, 4], [5, 6, 7, 8, 9])], 2, dict(MNIST_RECIPE, lr=0.05, momentum=0.9),
                      [Method("Homo Zip", "homo", match="zip"), Method("Zip + LMA", "hetero", "lma", "zip"),
                       Method("CLAFusion", "hetero")], width_pair=("a", "wide"))
    out = tmp_path / "cs"
    rows = run_class_split("mnist", out_dir=out, dataset=digits, setting=setting, samples=60, progress=False,
                           cache=tmp_path / "cache", command="hetfuse experiment class-split-mnist")
    cols, written = _read(out / "results.csv")
    assert cols[:14] == ["dataset", "arch_a", "arch_b", "pair", "direction", "classes_a", "classes_b", "method",
                         "depth_align", "match", "joint", "task_a", "task_b", "per_task_avg"]
    # 2 directions x (task A, task B, ensemble, 3 methods, elastic zip)
    assert len(rows) == len(written) == 2 * 7
    assert {r["method"] for r in rows} >= {"Task A", "Ensemble", "Zip + LMA", "Elastic zip (width)"}
    assert "| Zip + LMA |" in (out / "summary.md").read_text()
    # an interrupted run resumes: nothing is recomputed, nothing is lost
    partial = written[:5]
    with open(out / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(partial)
    again = run_class_split("mnist", out_dir=out, dataset=digits, setting=setting, samples=60, progress=False,
                            cache=tmp_path / "cache", resume=True)
    assert len(again) == 14
    with pytest.raises(HetfuseError, match="force=True"):
        run_class_split("mnist", out_dir=out, dataset=digits, setting=setting, samples=60, progress=False,
                        cache=tmp_path / "cache")


def test_class_split_keeps_every_finished_row_when_interrupted(digits, tmp_path, monkeypatch):
    """Rows are written as they finish: a run stopped in the middle of a direction loses only the row it was on."""
    import hetfuse.experiments.class_split as cs

    setting = cs.Setting("mnist", "digits", {"a": "mlp:24,24", "b": "mlp:24,24,24"},
                         [([0, 1, 2, 3, 4], [5, 6, 7, 8, 9])], 2, dict(cs.MNIST_RECIPE, lr=0.05, momentum=0.9),
                         [cs.Method("Homo Zip", "homo", match="zip"), cs.Method("CLAFusion", "hetero")])
    real, calls = cs.prepare_fusion, []

    def stopped_at_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(cs, "prepare_fusion", stopped_at_the_second)
    out = tmp_path / "cs"
    with pytest.raises(KeyboardInterrupt):
        cs.run_class_split("mnist", out_dir=out, dataset=digits, setting=setting, samples=60, progress=False,
                           cache=tmp_path / "cache")
    _, written = _read(out / "results.csv")
    assert [r["method"] for r in written] == ["Task A", "Task B", "Ensemble", "Homo Zip"]


def test_class_split_summaries_put_the_papers_numbers_beside_ours():
    from types import SimpleNamespace

    from hetfuse.experiments.class_split import PAPER_TABLE1, PAPER_TABLE3, _summary, settings

    for name, paper in [("width", PAPER_TABLE3), ("cifar-resnet", PAPER_TABLE1["resnet"])]:
        setting = settings(name)
        rows = [{"method": m, "joint": 50.0 + i, "task_a": 60.0, "task_b": 70.0, "per_task_avg": 65.0}
                for i, m in enumerate(["Task A", "Task B", "Ensemble", *[m.label for m in setting.methods]])]
        text = _summary(setting, rows, [0], 400, "hetfuse experiment", SimpleNamespace(note=""))
        for label, (joint, avg) in paper.items():
            line = next(ln for ln in text.splitlines() if ln.startswith(f"| {label} |"))
            assert line.endswith(f"| {joint} | {avg} |"), line
        # the CIFAR heads' scale differs from the papers' and the summary says so
        assert f"scored by {setting.embed_scale:g} x cosine" in text and "not the papers' 100" in text


def test_skill_transfer_methods_smoke(digits, tmp_path):
    from hetfuse.experiments import run_skill_methods

    rows = run_skill_methods(seeds=[0], out_dir=tmp_path / "sm", epochs=1, samples=50, progress=False, dataset=digits,
                             hidden_a=[24, 16], hidden_b=[24, 20, 12], cache=tmp_path / "cache", wb_grid=(0.1, 0.5))
    text = (tmp_path / "sm" / "summary.md").read_text()
    assert "| lma | elastic-zip |" in text and "n/a" in text  # perm/zip need equal widths: said, not hidden
    assert {r["match"] for r in rows if r["note"] == ""} >= {"ot-acts", "elastic-zip"}


def test_gap_settings_report_the_gap_before_and_after(digits, tmp_path):
    from hetfuse.experiments.class_split import MNIST_RECIPE, Method, Setting, gap_grid, run_class_split, settings

    assert {m.label for m in settings("gap-mnist").methods} == {m.label for m in gap_grid()}
    setting = Setting("gap-mnist", "digits", {"a": "mlp:24,24", "b": "mlp:24,24,24"},
                      [([0, 1, 2, 3, 4], [5, 6, 7, 8, 9])], 2, dict(MNIST_RECIPE, lr=0.05, momentum=0.9),
                      [Method("Perm + LMA", "hetero", "lma", "perm-acts"),
                       Method("Perm + LMA + LSQ", "hetero", "lma", "perm-acts", {"repair": "lsq"}, new=True),
                       Method("Perm + LMA + LSQ 1.5x", "hetero", "lma", "perm-acts",
                              {"repair": "lsq", "budget": 1.5}, new=True),
                       Method("Perm + LMA + LSQ, 30 samples", "hetero", "lma", "perm-acts",
                              {"repair": "lsq", "samples": 30}, new=True)])
    out = tmp_path / "gap"
    rows = run_class_split("gap-mnist", out_dir=out, dataset=digits, setting=setting, samples=60, progress=False,
                           cache=tmp_path / "cache", command="hetfuse experiment class-split-gap-mnist")
    assert all(r["joint"] == r["joint"] for r in rows)  # every row computed (no NaN)
    text = (out / "summary.md").read_text()
    assert "| best existing method | Perm + LMA |" in text
    assert "| best new method, 1x width | Perm + LMA + LSQ" in text and "1.5x |" not in text.split("1x width")[1][:40]


def test_vit_class_split_setting_has_two_splits_and_the_papers_rows():
    from hetfuse.experiments.class_split import paper_grid, settings
    from hetfuse.models import build_model

    st = settings("vit-mnist")
    assert len(st.splits) >= 2 and {m.label for m in paper_grid()} <= {m.label for m in st.methods}
    for arch in st.archs.values():  # both depths build for MNIST's shape
        m = build_model(arch, input_dim=1, output_dim=512, input_shape=(1, 28, 28))
        assert m(torch.zeros(2, 1, 28, 28)).shape == (2, 512)


def test_every_class_split_row_is_a_valid_fusion_config():
    """A typo in a row's parameters would only show as a NaN row after hours of fusions: every method of every
    setting builds its FusionConfig (as the runner does) without an error."""
    from hetfuse.experiments.class_split import settings

    names = ["mnist", "cifar-resnet", "cifar-vgg", "width", "converged-resnet", "converged-vgg", "converged-width",
             "gap-mnist", "gap-converged-resnet", "vit-mnist"]
    for name in names:
        for m in settings(name).methods:
            params = dict(m.params)
            target, samples = params.pop("target", None), params.pop("samples", 100)
            cfg = FusionConfig(depth_align=m.depth_align, match=m.match, samples=samples, target=target, **params)
            assert cfg.match == m.match, (name, m.label)
    with pytest.raises(HetfuseError):
        FusionConfig(match="elastic-zip", no_such_parameter=1)


def test_skill_transfer_gap_grid_smoke(digits, tmp_path):
    from hetfuse.experiments import run_skill_methods

    grid = [("cla", "ot-acts", {}), ("cla", "ot-acts", {"repair": "lsq"})]
    rows = run_skill_methods(seeds=[0], out_dir=tmp_path / "sg", epochs=1, samples=50, progress=False, dataset=digits,
                             hidden_a=[24, 16], hidden_b=[24, 20, 12], cache=tmp_path / "cache", wb_grid=(0.1, 0.5),
                             grid=grid)
    assert {r["match"] for r in rows} == {"ot-acts", "ot-acts + lsq"}
    text = (tmp_path / "sg" / "summary.md").read_text()
    assert "| cla | ot-acts + lsq |" in text and "− best parent:" in text


@pytest.mark.parametrize("table", [1, 2, 3, 4])
def test_clafusion_tables_smoke(table, tmp_path):
    """Every table end to end on a tiny fake CIFAR with tiny networks; rows, summary with the paper's numbers,
    and resuming without recomputing."""
    from hetfuse.data import Dataset
    from hetfuse.experiments import run_clafusion_table

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        y = torch.arange(80) % 10
        x = torch.randn(80, 3, 32, 32, generator=g) + y.view(-1, 1, 1, 1) * 0.3
        ds = Dataset(name="fake", x_train=x, y_train=y, x_test=x[:20], y_test=y[:20], num_classes=10,
                     input_shape=(3, 32, 32))
        archs = ("resnet26:w=0.25", "resnet20:w=0.25") if table in (1, 2) else ("vgg13:w=0.0625,bn",
                                                                                "vgg11:w=0.0625,bn")
        kw = dict(out_dir=tmp_path / "t", epochs=1, finetune_epochs=1, samples=16, progress=False,
                  cache=tmp_path / "cache", dataset=ds, archs=archs, fit_overrides={"batch_size": 24},
                  temperatures=(4.0, 1.0), alphas=(0.7,), command=f"hetfuse experiment clafusion-table{table}")
        rows = run_clafusion_table(table, **kw)
        fields, written = _read(tmp_path / "t" / "results.csv")
        assert len(written) == len(rows) and fields[:6] == ["table", "seed", "model", "phase", "temperature", "alpha"]
        phases = {(r["model"], r["phase"]) for r in rows}
        want = {1: {("MF", "one-shot"), ("random ResNet34", "finetune"), ("MB depth-aligned", "finetune")},
                2: {("HMT", "transfer"), ("HMT + CLA + OTFusion", "finetune")},
                3: {("MF", "retrain"), ("MB depth-aligned", "retrain"), ("MA", "parent")},
                4: {("random MF", "distill"), ("MF", "distill")}}[table]
        assert want <= phases
        if table in (1, 3):  # the depth-aligned B computes B's function
            acc = {(r["model"], r["phase"]): r["accuracy"] for r in rows}
            assert acc[("MB depth-aligned", "parent")] == acc[("MB", "parent")]
        if table == 4:
            assert len([r for r in rows if r["phase"] == "distill"]) == 5 * 2
        text = (tmp_path / "t" / "summary.md").read_text()
        assert "paper" in text and "Scale: CPU run" in text
        again = run_clafusion_table(table, resume=True, **kw)  # every row is there: nothing is computed again
        assert [r["accuracy"] for r in again] == [r["accuracy"] for r in written]
        assert (tmp_path / "t" / "summary.md").read_text().count("n/a") == text.count("n/a")
    finally:
        torch.set_num_threads(n)
