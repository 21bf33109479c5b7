"""Training config, lr schedule, optimizer state round trip and the metrics log (no store needed)."""

import json
import math

import pytest
import torch

from difflens.errors import DifflensError
from difflens.train.config import DictSpec, TrainConfig, expand_specs
from difflens.train.logbook import MetricsLog
from difflens.train.optim_io import load_optimizer, save_optimizer
from difflens.train.schedule import lr_factor


def test_defaults_follow_the_flux_paper():
    cfg = TrainConfig(steps=10)
    assert (cfg.batch_size, cfg.lr, cfg.beta1, cfg.beta2, cfg.grad_clip) == (1024, 2e-4, 0.0, 0.99, 10.0)


def test_tokens_give_steps_and_length_is_required():
    assert TrainConfig(tokens=2049, batch_size=1024).total_steps() == 3
    with pytest.raises(DifflensError, match="--train-steps"):
        TrainConfig().total_steps()
    with pytest.raises(DifflensError, match="either steps or tokens"):
        TrainConfig(steps=1, tokens=5)
    with pytest.raises(DifflensError, match="decay"):
        TrainConfig(steps=1, decay="exp")
    with pytest.raises(DifflensError, match="unknown key.*bogus"):
        TrainConfig.from_dict({"steps": 3, "bogus": 1})


def test_config_round_trips_through_json():
    cfg = TrainConfig(steps=7, timestep_range=(0.2, 0.8), denoise_steps=[0, 1])
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_k_larger_than_width_is_refused():
    with pytest.raises(DifflensError, match="k=64 is larger than width=32"):
        DictSpec(name="a", arch="topk", site="s", width=32, k=64)
    with pytest.raises(DifflensError, match="needs k"):
        DictSpec(name="a", arch="topk", site="s", width=32)
    DictSpec(name="a", arch="relu", site="s", width=32)  # relu needs no k


def test_grid_expansion_and_names():
    specs = expand_specs(
        [{"arch": ["topk", "tide"], "k": [4, 8]}, {"arch": "itda", "k": 4, "width": 100, "name": "atoms"}],
        defaults={"site": "b.1:img", "width": 64, "normalization": "standardize"},
    )
    names = [s.name for s in specs]
    assert names == ["topk-w64-k4", "topk-w64-k8", "tide-w64-k4", "tide-w64-k8", "atoms"]
    assert specs[0].options == {"normalization": "standardize"}
    layer = expand_specs([{"arch": "topk", "k": 2, "width": 8, "site": ["a.1:img", "a.2:img"]}])
    assert [s.name for s in layer] == ["a.1-img-topk-w8-k2", "a.2-img-topk-w8-k2"]
    with pytest.raises(DifflensError, match="unique"):
        expand_specs([{"arch": "topk", "k": [1, 2], "width": 8, "site": "s", "name": "same"}])
    with pytest.raises(DifflensError, match="missing site"):
        expand_specs([{"arch": "topk", "k": 1, "width": 8}])


def test_lr_schedule():
    f = [lr_factor(s, 10, 2, "none", 0.2) for s in range(10)]
    assert f[:3] == [0.5, 1.0, 1.0] and f[-1] == 1.0
    lin = [lr_factor(s, 10, 0, "linear", 0.5) for s in range(10)]
    assert lin[:5] == [1.0] * 5 and lin[5:] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
    cos = [lr_factor(s, 10, 0, "cosine", 0.5) for s in range(10)]
    assert cos[5] == pytest.approx(1.0) and cos[7] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.4)))
    assert all(a >= b for a, b in zip(cos, cos[1:]))


def _trained_adam():
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2, betas=(0.0, 0.99))
    for _ in range(3):
        opt.zero_grad()
        m(torch.randn(5, 3)).pow(2).sum().backward()
        opt.step()
    return m, opt


def test_optimizer_state_round_trip_without_pickle(tmp_path):
    m, opt = _trained_adam()
    save_optimizer(opt, tmp_path / "opt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["opt.json", "opt.safetensors"]
    m2 = torch.nn.Linear(3, 2)
    m2.load_state_dict(m.state_dict())
    opt2 = torch.optim.Adam(m2.parameters(), lr=5.0)
    load_optimizer(opt2, tmp_path / "opt")
    assert opt2.param_groups[0]["lr"] == 1e-2 and opt2.param_groups[0]["betas"] == (0.0, 0.99)
    x = torch.randn(4, 3)
    for mm, oo in ((m, opt), (m2, opt2)):
        oo.zero_grad()
        mm(x).pow(2).sum().backward()
        oo.step()
    assert torch.equal(m.weight, m2.weight) and torch.equal(m.bias, m2.bias)
    with pytest.raises(DifflensError, match="different parameters"):
        load_optimizer(torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))]), tmp_path / "opt")


def test_metrics_log_truncates_on_resume_and_renders_csv(tmp_path):
    log = MetricsLog(tmp_path)
    for s in (1, 2, 3):
        log.append({"kind": "train", "step": s, "loss": 1.0 / s, "fvu": float("nan")})
    log.append({"kind": "eval", "step": 3, "fvu": 0.5, "l0": 4.0, "by_timestep": [{"step": 0}]})
    with open(log.jsonl, "a") as f:
        f.write('{"kind": "train", "st')  # a line cut by a crash
    log.truncate_after(2)
    assert [r["step"] for r in log.records()] == [1, 2]
    assert log.records()[0]["fvu"] is None  # NaN stored as null: valid JSON
    log.append({"kind": "eval", "step": 4, "fvu": 0.25, "l0": 3.0})
    log.close()
    lines = log.csv.read_text().splitlines()
    assert lines[0] == "kind,step,loss,fvu,l0"
    assert lines[-1] == "eval,4,,0.25,3.0"


def test_dictionary_options_are_checked_against_the_architectures_config():
    from difflens.train import members

    cfg = TrainConfig(steps=1)
    spec = DictSpec(name="a", arch="topk", site="s", width=8, k=2, options={"tide_hidden": 4})
    with pytest.raises(DifflensError, match="tide_hidden for arch topk"):
        members.dict_config(spec, d_in=4, model=None, cfg=cfg)
    ok = members.dict_config(DictSpec(name="t", arch="tide", site="s", width=8, k=2, options={"tide_hidden": 4}),
                             d_in=4, model=None, cfg=TrainConfig(steps=1, auxk=False))
    assert ok.tide_hidden == 4 and ok.auxk is False


@pytest.mark.parametrize("decay", ["none", "linear", "cosine"])
@pytest.mark.parametrize("total, warmup, fraction", [(10, 2, 0.5), (37, 7, 0.2), (5, 100, 1.0), (400, 100, 0.05), (3, 0, 0.2)])
def test_torch_schedulers_give_the_documented_schedule(decay, total, warmup, fraction):
    from difflens.train.schedule import torch_lr_factors

    got = torch_lr_factors(total, warmup, decay, fraction)
    assert got == pytest.approx([lr_factor(s, total, warmup, decay, fraction) for s in range(total)], abs=1e-9)
