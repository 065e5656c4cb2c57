"""The hybrid: routing, schedules, state bytes, exact resume, configs and bad input."""

import copy
import dataclasses
import io
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from muongpt import MuonGPTError
from muongpt.optim import SOAP, CombinedOptimizer, Muon, build_optimizer
from muongpt.optim.config import OPTIMIZER_CONFIGS
from muongpt.train.schedule import lr_multiplier, muon_momentum

CONF_DIR = Path(__file__).resolve().parents[1] / "src" / "muongpt" / "conf"
VOCAB, DIM = 64, 16


pytestmark = pytest.mark.usefixtures("single_thread")


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(DIM, DIM, bias=False) for _ in range(3))
        self.proj = nn.Linear(DIM, DIM, bias=False)

    def forward(self, x):
        att = (self.q(x) @ self.k(x).mT / DIM**0.5).softmax(-1)
        return self.proj(att @ self.v(x))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.mixer = Attention()
        self.mlp = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.ReLU(), nn.Linear(4 * DIM, DIM))
        self.norm = nn.LayerNorm(DIM)  # weight and bias: vectors
        self.gate = nn.Parameter(torch.tensor(0.5))  # a scalar
        self.value_embed = nn.Embedding(VOCAB, DIM)  # an embedding inside a block

    def forward(self, x, idx):
        x = x + self.gate * self.mixer(self.norm(x) + self.value_embed(idx))
        return x + self.mlp(x)


class TinyModel(nn.Module):
    """A model that declares its optimizer groups: muongpt's layout plus odd extras."""

    config = SimpleNamespace(n_embd=DIM, n_layer=2)

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.x0_lambdas = nn.Parameter(torch.ones(2))
        self.extra_proj = nn.Parameter(torch.randn(DIM, DIM) * 0.1)  # ndim 2 outside blocks
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)
        self.frozen = nn.Parameter(torch.ones(DIM, DIM), requires_grad=False)

    def forward(self, idx, targets):
        x = x0 = self.embed(idx) @ self.extra_proj
        for lam, block in zip(self.x0_lambdas, self.blocks):
            x = block(x + lam * x0, idx)
        return nn.functional.cross_entropy(self.lm_head(x).flatten(0, 1), targets.flatten())

    def optimizer_groups(self):
        groups = {"matrix": [], "embed": [], "head": [], "scalar": []}
        for name, p in self.named_parameters():
            if p.requires_grad:
                groups[expected_group(name, p)].append((name, p))
        return groups


EXPECTED_GROUP = {  # name prefix / suffix -> group
    "embed.weight": "embed",
    "extra_proj": "embed",
    "x0_lambdas": "scalar",
    "lm_head.weight": "head",
}


def expected_group(name, p):
    if name in EXPECTED_GROUP:
        return EXPECTED_GROUP[name]
    if p.ndim < 2:
        return "scalar"
    if "value_embed" in name:
        return "embed"
    return "matrix"


def batch(seed):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, VOCAB, (2, 8), generator=gen)
    return idx, torch.roll(idx, -1, dims=1)


def train_steps(model, opt, seeds):
    for s in seeds:
        opt.apply_schedule(lr_multiplier(s, 20, 2, 5, 0.1), muon_momentum(s, 0.85, 0.95, 300))
        model(*batch(s)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def config(name, **overrides):
    return OPTIMIZER_CONFIGS[name](**overrides)


@pytest.mark.parametrize("name", ["muon", "soap", "adamw"])
def test_routing_covers_every_parameter_once(name):
    model = TinyModel()
    opt = build_optimizer(model, config(name))
    seen = {}
    for inner in opt.optimizers:
        for group in inner.param_groups:
            for pname, p in zip(group["param_names"], group["params"]):
                assert pname not in seen, f"{pname} in two groups"
                seen[pname] = (type(inner), group["name"])
                assert group["name"] == expected_group(pname, p), pname
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(seen) == trainable and "frozen" not in seen
    matrix_kind = {"muon": Muon, "soap": SOAP, "adamw": torch.optim.AdamW}[name]
    for kind, group in seen.values():
        assert kind is (matrix_kind if group == "matrix" else torch.optim.AdamW)


@pytest.mark.parametrize("model_name", ["gpt", "speedrun"])
def test_routing_on_the_real_models(model_name):
    from muongpt.model import MODELS

    schema, cls = MODELS[model_name]
    extra = (
        dict(backout_after=1, value_embeds=1, bigram_rows=64) if model_name == "speedrun" else {}
    )
    model = cls(schema(vocab_size=200, n_layer=2, n_head=2, n_embd=32, **extra))
    opt = build_optimizer(model, config("muon"))
    placed = {
        n: (type(o), g["name"])
        for o in opt.optimizers
        for g in o.param_groups
        for n in g["param_names"]
    }
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(placed) == sorted(names) and len(names) == sum(
        len(g["params"]) for g in opt.param_groups
    )
    for n, p in model.named_parameters():
        kind, group = placed[n]
        if n.startswith("blocks.") and p.ndim >= 2:
            assert kind is Muon and group == "matrix"
        else:
            assert kind is torch.optim.AdamW and group != "matrix"
    assert placed["embed.weight"][1] == "embed" and placed["lm_head.weight"][1] == "head"
    assert opt.summary().splitlines()[0].startswith("optimizer muon: the model's groups")


def test_adamw_lr_scaling_schedule_and_summary():
    model = TinyModel()
    opt = build_optimizer(model, config("muon"))
    scale = (DIM / 768) ** -0.5
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["matrix"]["base_lr"] == 0.05  # Muon lr is not width-scaled
    assert groups["embed"]["base_lr"] == pytest.approx(0.6 * scale)
    assert groups["head"]["base_lr"] == pytest.approx(0.008 * scale)
    assert groups["scalar"]["base_lr"] == pytest.approx(0.04 * scale)
    assert all(
        g["betas"] == (0.8, 0.95) and g["eps"] == 1e-10 for g in opt.optimizers[1].param_groups
    )

    opt.apply_schedule(0.25, 0.9)
    for g in opt.param_groups:
        assert g["lr"] == g["base_lr"] * 0.25
    assert groups["matrix"]["momentum"] == pytest.approx(0.9)
    opt.apply_schedule(1.0)  # no momentum given: Muon's stays
    assert groups["matrix"]["momentum"] == pytest.approx(0.9)

    summary = opt.summary()
    for g in opt.param_groups:
        n_params = sum(p.numel() for p in g["params"])
        line = next(li for li in summary.splitlines() if f" {g['name']} " in li)
        assert f"{len(g['params'])} tensors" in line and f"{n_params:,} params" in line


@pytest.mark.parametrize("name", ["muon", "soap", "adamw"])
def test_adamw_overrides_give_a_side_group_its_own_betas_eps_and_decay(name):
    """optimizer.adamw_overrides: the head trains with betas (0.5, 0.95) and weight decay 0.1 and
    the scalars with eps 1e-6, each equal over three steps to a plain torch AdamW with those
    settings; every other side group keeps the shared ones (and no decay)."""
    overrides = {"head": {"betas": [0.5, 0.95], "weight_decay": 0.1}, "scalar": {"eps": 1e-6}}
    model = TinyModel()
    opt = build_optimizer(model, config(name, adamw_overrides=overrides))
    shared_betas = (0.9, 0.95) if name == "adamw" else (0.8, 0.95)
    shared_eps = 1e-8 if name == "adamw" else 1e-10
    plain = copy.deepcopy(model)
    params = dict(plain.named_parameters())
    references = []
    for group in opt.param_groups:
        if group["name"] == "matrix":
            continue
        expected = {
            "betas": shared_betas, "eps": shared_eps, "weight_decay": 0.0,
            **{k: tuple(v) if k == "betas" else v for k, v in overrides.get(group["name"], {}).items()},
        }  # fmt: skip
        assert {k: group[k] for k in expected} == expected, group["name"]
        names = group["param_names"]
        references.append(
            (names, torch.optim.AdamW([params[n] for n in names], lr=group["lr"], **expected))
        )
    summary = {line.split()[1]: line for line in opt.summary().splitlines()[1:-1]}
    assert summary["head"].endswith("betas (0.5, 0.95)  wd 0.1")
    assert summary["scalar"].endswith("eps 1e-06") and summary["embed"].endswith(
        f"lr {opt.param_groups[1]['base_lr']:.4g}"
    )
    trained = dict(model.named_parameters())
    matrices = next(g["param_names"] for g in opt.param_groups if g["name"] == "matrix")
    for s in range(3):
        model(*batch(s)).backward()
        plain(*batch(s)).backward()
        opt.step()
        for _, ref in references:
            ref.step()
        opt.zero_grad(set_to_none=True)
        plain.zero_grad(set_to_none=True)
        with torch.no_grad():  # the hidden matrices as trained, so both forwards stay equal
            for n in matrices:
                params[n].copy_(trained[n])
    for names, _ in references:
        for n in names:
            torch.testing.assert_close(trained[n], params[n], rtol=0, atol=0, msg=n)
    assert not torch.equal(trained["lm_head.weight"], TinyModel().lm_head.weight)


@pytest.mark.parametrize("n_embd, n_layer", [(32, 2), (64, 2), (32, 8)])
def test_adamw_matrix_lr_scales_as_one_over_width_and_sqrt_depth(n_embd, n_layer):
    """AdamW's hidden-matrix lr: cfg.lr * (768 / n_embd) * sqrt(12 / n_layer), the rule fitted in
    docs/optimizers.md (1 at d12); the side groups keep (n_embd / 768) ** -0.5."""
    from muongpt.model import MODELS

    schema, cls = MODELS["gpt"]
    model = cls(schema(vocab_size=200, n_layer=n_layer, n_head=2, n_embd=n_embd))
    cfg = config("adamw")
    groups = {g["name"]: g for g in build_optimizer(model, cfg).param_groups}
    assert groups["matrix"]["base_lr"] == pytest.approx(
        cfg.lr * (768 / n_embd) * (12 / n_layer) ** 0.5
    )
    assert groups["embed"]["base_lr"] == pytest.approx(cfg.embed_lr * (768 / n_embd) ** 0.5)
    # under Muon the same widths leave the side groups where they were
    muon = {g["name"]: g for g in build_optimizer(model, config("muon")).param_groups}
    assert muon["embed"]["base_lr"] == pytest.approx(groups["embed"]["base_lr"])


def test_adamw_state_is_two_buffers_per_parameter():
    model = TinyModel()
    opt = build_optimizer(model, config("adamw"))
    train_steps(model, opt, [0])
    (adamw,) = opt.optimizers
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(adamw.state) == len(trainable)
    for p in trainable:
        buffers = {k: t for k, t in adamw.state[p].items() if k != "step"}
        assert all(t.shape == p.shape for t in buffers.values())
        assert sorted(buffers) == ["exp_avg", "exp_avg_sq"]
        assert all(t.dtype == torch.float32 for t in buffers.values())
    bytes_ = sum(t.nbytes for s in adamw.state.values() for k, t in s.items() if k != "step")
    assert bytes_ == 2 * 4 * sum(p.numel() for p in trainable)


def test_muon_hybrid_state_bytes():
    model = TinyModel()
    opt = build_optimizer(model, config("muon"))
    train_steps(model, opt, [0])
    muon, adamw = opt.optimizers
    matrices = muon.param_groups[0]["params"]
    assert sum(t.nbytes for s in muon.state.values() for t in s.values()) == 4 * sum(
        p.numel() for p in matrices
    )
    others = [p for g in adamw.param_groups for p in g["params"]]
    adam_bytes = sum(t.nbytes for s in adamw.state.values() for k, t in s.items() if k != "step")
    assert adam_bytes == 8 * sum(p.numel() for p in others)


@pytest.mark.parametrize(
    "name,overrides",
    [("muon", {}), ("soap", {"precondition_frequency": 2}), ("adamw", {"weight_decay": 0.1})],
)
def test_state_dict_resume_is_bit_identical(name, overrides):
    torch.manual_seed(0)
    model = TinyModel()
    opt = build_optimizer(model, config(name, **overrides))
    train_steps(model, opt, range(4))

    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model = copy.deepcopy(model)
    resumed = build_optimizer(resumed_model, config(name, **overrides))
    resumed.load_state_dict(saved)

    train_steps(model, opt, [4])
    train_steps(resumed_model, resumed, [4])
    for (n, a), b in zip(model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(a, b), n


def test_load_state_dict_refuses_a_different_optimizer():
    model = TinyModel()
    saved = build_optimizer(model, config("muon")).state_dict()
    with pytest.raises(MuonGPTError, match="optimizer state"):
        build_optimizer(model, config("soap")).load_state_dict(saved)


def test_dictconfig_and_hydra_override():
    hydra = pytest.importorskip("hydra")
    from muongpt.config import CONF_DIR as LEAD_CONF_DIR
    from muongpt.config import register_configs

    register_configs()
    with hydra.initialize_config_dir(config_dir=str(LEAD_CONF_DIR), version_base=None):
        cfg = hydra.compose("config", overrides=["optimizer=soap", "optimizer.lr=0.003"])
    opt = build_optimizer(TinyModel(), cfg.optimizer)
    soap = opt.optimizers[0]
    assert isinstance(soap, SOAP) and soap.param_groups[0]["lr"] == 0.003
    # a side group's AdamW options from the command line (a dict field: keys added with +)
    overrides = ["+optimizer.adamw_overrides.head.betas=[0.5,0.95]"]
    overrides.append("+optimizer.adamw_overrides.head.weight_decay=0.1")
    with hydra.initialize_config_dir(config_dir=str(LEAD_CONF_DIR), version_base=None):
        cfg = hydra.compose("config", overrides=overrides)
    groups = build_optimizer(TinyModel(), cfg.optimizer).param_groups
    head = next(g for g in groups if g["name"] == "head")
    assert head["betas"] == (0.5, 0.95) and head["weight_decay"] == 0.1


@pytest.mark.parametrize("name", ["muon", "soap", "adamw"])
def test_the_builder_reads_every_field_of_each_schema(name):
    """No option is dead: building the optimizer reads each field of its schema."""
    schema = OPTIMIZER_CONFIGS[name]
    read = set()

    class Recording(schema):
        def __getattribute__(self, key):
            if key in {f.name for f in dataclasses.fields(schema)}:
                read.add(key)
            return object.__getattribute__(self, key)

    build_optimizer(TinyModel(), Recording())
    # the trainer's schedule reads these
    schedule = {"momentum_start", "momentum_warmup_steps", "momentum_cooldown_steps"}
    assert read | schedule >= {f.name for f in dataclasses.fields(schema)}


def test_a_model_must_declare_its_groups():
    model = nn.Linear(4, 4)
    model.config = SimpleNamespace(n_embd=4)
    with pytest.raises(MuonGPTError, match="optimizer_groups"):
        build_optimizer(model, config("muon"))


def test_bad_config_and_model():
    model = TinyModel()
    cases = [
        ({"lr": 0.0}, "optimizer.lr"),
        ({"embed_lr": -1.0}, "optimizer.embed_lr"),
        ({"adam_betas": [0.9, 1.0]}, r"optimizer.adam_betas\[1\]"),
        ({"momentum": 1.0}, "optimizer.momentum"),
        ({"scale_mode": "big"}, "scale_mode"),
        ({"adamw_overrides": {"matrix": {"eps": 1e-8}}}, "adamw_overrides.matrix: unknown group"),
        ({"adamw_overrides": {"head": {"beta1": 0.9}}}, r"unknown option\(s\) beta1"),
        ({"adamw_overrides": {"head": {"betas": [0.9]}}}, "head.betas must be two numbers"),
        ({"adamw_overrides": {"head": {"weight_decay": -1}}}, "head.weight_decay must be >= 0"),
        ({"adamw_overrides": {"embed": {"eps": "x"}}}, "embed.eps must be a number, got 'x'"),
    ]
    for overrides, message in cases:
        with pytest.raises(MuonGPTError, match=message):
            build_optimizer(model, config("muon", **overrides))
    with pytest.raises(MuonGPTError, match="optimizer.name must be one of"):
        build_optimizer(model, {"name": "sgd"})
    with pytest.raises(MuonGPTError, match=r"optimizer.betas\[0\]"):
        build_optimizer(model, config("soap", betas=[-0.1, 0.9]))
    with pytest.raises(MuonGPTError, match="unknown optimizer.adamw config key"):
        build_optimizer(model, {"name": "adamw", "lr": 1e-3, "learning_rate": 1e-3})
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(MuonGPTError, match="empty parameter list"):
        build_optimizer(model, config("adamw"))
    with pytest.raises(MuonGPTError, match="no optimizers"):
        CombinedOptimizer([])


def test_lr_multiplier_and_momentum_schedules():
    total, warmup, cooldown, final = 100, 10, 40, 0.1
    for step in range(total + 1):
        got = lr_multiplier(step, total, warmup, cooldown, final)
        if step < warmup:
            want = (step + 1) / warmup
        elif step < total - cooldown:
            want = 1.0
        else:
            want = final + (1 - final) * (total - step) / cooldown
        assert got == pytest.approx(want)
    assert lr_multiplier(60, total, warmup, cooldown, final) == 1.0
    assert lr_multiplier(100, total, warmup, cooldown, final) == pytest.approx(final)
    assert lr_multiplier(5, 10) == 1.0  # no warmup, no cooldown
    assert muon_momentum(0, 0.85, 0.95, 300) == 0.85
    assert muon_momentum(150, 0.85, 0.95, 300) == pytest.approx(0.90)
    assert muon_momentum(10_000, 0.85, 0.95, 300) == 0.95
    assert muon_momentum(3, 0.85, 0.95, 0) == 0.95
    # cooled down over the last 4 of 12 steps, back towards 0.85 at step 12
    cooled = [muon_momentum(s, 0.85, 0.95, 0, 4, 12) for s in range(12)]
    assert cooled == pytest.approx([0.95] * 9 + [0.925, 0.90, 0.875])
    # a warm-up still rising at the cooldown: the lower of the two ramps
    rising = [muon_momentum(s, 0.85, 0.95, 20, 4, 12) for s in range(12)]
    assert rising == pytest.approx([0.85 + 0.005 * s for s in range(11)] + [0.875])
    with pytest.raises(MuonGPTError, match="exceed"):
        lr_multiplier(0, 10, 6, 6)
    with pytest.raises(MuonGPTError, match="final_lr_frac"):
        lr_multiplier(0, 10, 0, 0, 1.5)


def test_the_sqrt_cooldown_falls_as_one_minus_the_root_of_its_progress():
    """f + (1 - f)(1 - sqrt(p)), p the share of the cooldown done: below the linear one inside
    the cooldown, equal at both of its ends, and untouched before it."""
    total, warmup, cooldown, final = 100, 10, 40, 0.1
    for step in range(total + 1):
        got = lr_multiplier(step, total, warmup, cooldown, final, "sqrt")
        linear = lr_multiplier(step, total, warmup, cooldown, final)
        if step <= total - cooldown:
            assert got == linear
            continue
        done = (step - (total - cooldown)) / cooldown
        assert got == pytest.approx(final + (1 - final) * (1 - done**0.5))
        assert got < linear or step == total
    # a quarter of the way into the cooldown: 1 - sqrt(1/4) = 0.5 (linear: 0.75)
    assert lr_multiplier(70, total, warmup, cooldown, 0.0, "sqrt") == pytest.approx(0.5)
    with pytest.raises(MuonGPTError, match="cooldown_shape must be one of"):
        lr_multiplier(0, 10, 0, 0, 0.0, "cosine")


@pytest.mark.parametrize("name", ["muon", "soap"])
def test_loading_a_fresh_state_undoes_steps(name):
    """The trainer's compile warm-up: save the empty state, step, load it back, start over."""
    torch.manual_seed(0)
    model = TinyModel()
    start = copy.deepcopy(model)
    opt = build_optimizer(model, config(name))
    fresh_state = copy.deepcopy(opt.state_dict())
    train_steps(model, opt, range(3))
    model.load_state_dict(start.state_dict())
    opt.load_state_dict(fresh_state)
    train_steps(model, opt, range(2))
    reference = build_optimizer(start, config(name))
    train_steps(start, reference, range(2))
    for (n, a), b in zip(model.named_parameters(), start.parameters()):
        assert torch.equal(a, b), n


TABLES = ("embed", "head")


def reference_delayed_steps(model, opt, seeds, every):
    """The plain reference of ``embed_head_every``: an every-step optimizer whose embedding and
    head parameters get no gradient on off steps and the mean of the held ones on the N-th."""
    tables = [p for g in opt.param_groups if g["name"] in TABLES for p in g["params"]]
    held = {}
    for n, s in enumerate(seeds, start=1):
        opt.apply_schedule(lr_multiplier(s, 20, 2, 5, 0.1), muon_momentum(s, 0.85, 0.95, 300))
        model(*batch(s)).backward()
        for p in tables:
            held[p] = p.grad if p not in held else held[p] + p.grad
            p.grad = None if n % every else held.pop(p) / every
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", ["muon", "adamw"])
def test_embed_and_head_step_every_other_step_on_the_mean_gradient(name):
    torch.manual_seed(0)
    model, ref = TinyModel(), None
    ref = copy.deepcopy(model)
    opt = build_optimizer(model, config(name, embed_head_every=2))
    train_steps(model, opt, range(5))
    reference_delayed_steps(ref, build_optimizer(ref, config(name)), range(5), 2)
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7, msg=n)
    # step 5 was an off step: the tables still hold its gradient, the rest hold none
    held = {n for n, p in model.named_parameters() if p.grad is not None}
    assert held == {"embed.weight", "extra_proj", "lm_head.weight"} | {
        f"blocks.{i}.value_embed.weight" for i in range(2)
    }
    assert "every 2 steps" in opt.summary()


def test_resume_between_two_table_steps_is_bit_identical():
    torch.manual_seed(0)
    model = TinyModel()
    opt = build_optimizer(model, config("muon", embed_head_every=2))
    train_steps(model, opt, range(3))  # step 3 is off: its table gradients are held
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed_model = copy.deepcopy(model)
    for p in resumed_model.parameters():
        p.grad = None  # a new process has no gradients: they come from the checkpoint
    resumed = build_optimizer(resumed_model, config("muon", embed_head_every=2))
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    train_steps(model, opt, [3])
    train_steps(resumed_model, resumed, [3])
    for (n, a), b in zip(model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(a, b), n


def test_a_skipped_step_drops_the_held_table_gradients():
    torch.manual_seed(0)
    model = TinyModel()
    opt = build_optimizer(model, config("muon", embed_head_every=2))
    train_steps(model, opt, [0])
    assert model.embed.weight.grad is not None
    model(*batch(1)).backward()
    opt.zero_grad(set_to_none=True)  # no step(): a non-finite loss was skipped
    assert all(p.grad is None for p in model.parameters())
    assert opt.steps == 1


def test_delayed_table_steps_are_refused_by_the_sharded_forms_and_checked():
    from muongpt.optim.distributed import distribute
    from muongpt.optim.fsdp import fsdp_optimizer

    model = TinyModel()
    opt = build_optimizer(model, config("muon", embed_head_every=2))
    with pytest.raises(MuonGPTError, match="embed_head_every > 1 works in one process only"):
        distribute(opt, model)
    with pytest.raises(MuonGPTError, match="embed_head_every"):
        fsdp_optimizer(opt)
    with pytest.raises(MuonGPTError, match="optimizer.embed_head_every must be an integer >= 1"):
        build_optimizer(model, config("muon", embed_head_every=0))


class TiedModel(TinyModel):
    """Embedding and head kept as one weight by the optimizer: (copy, master) declared."""

    def __init__(self):
        super().__init__()
        with torch.no_grad():
            self.embed.weight.copy_(self.lm_head.weight)

    def tied_weights(self):
        return self.embed.weight, self.lm_head.weight


class SharedModel(TinyModel):
    """The plain reference: one Parameter used as the embedding and as the head."""

    def __init__(self):
        super().__init__()
        self.lm_head.weight = self.embed.weight

    def optimizer_groups(self):
        groups = super().optimizer_groups()  # the shared weight is named embed.weight
        shared = [(n, p) for n, p in groups["embed"] if p is self.lm_head.weight]
        groups["embed"] = [(n, p) for n, p in groups["embed"] if p is not self.lm_head.weight]
        groups["head"] = shared
        return groups


@pytest.mark.parametrize("name", ["muon", "adamw"])
def test_tied_pair_trains_as_one_shared_weight_then_apart(name):
    """While tied, the pair moves exactly as one Parameter used twice (autograd sums its two
    gradients; the head's AdamW steps it); untied, the copy trains on in its own group."""
    torch.manual_seed(0)
    model = TiedModel()
    ref = SharedModel()
    ref.load_state_dict(model.state_dict())
    opt, ref_opt = build_optimizer(model, config(name)), build_optimizer(ref, config(name))
    assert opt.tie == (model.embed.weight, model.lm_head.weight) and opt.tied
    train_steps(model, opt, range(4))
    train_steps(ref, ref_opt, range(4))
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=n)
    assert torch.equal(model.embed.weight, model.lm_head.weight)
    embed_adam = next(o for o in opt.optimizers for g in o.param_groups if g["name"] == "embed")
    assert model.embed.weight not in embed_adam.state  # never stepped on its own while tied

    # the untie: the model scales the copy's rows (here by s), and the copy's AdamW starts from
    # the master's step count and moments, scaled as the rows' gradients are (1/s, 1/s^2)
    head_adam = next(o for o in opt.optimizers for g in o.param_groups if g["name"] == "head")
    master = {k: v.clone() for k, v in head_adam.state[model.lm_head.weight].items()}
    s = torch.rand(model.embed.weight.shape[0], 1) + 0.5
    with torch.no_grad():
        model.embed.weight.mul_(s)
    opt.untie(s)
    assert not opt.tied
    seeded = embed_adam.state[model.embed.weight]
    assert torch.equal(seeded["step"], master["step"]) and seeded["step"] > 0
    torch.testing.assert_close(seeded["exp_avg"], master["exp_avg"] / s, rtol=1e-6, atol=0)
    torch.testing.assert_close(seeded["exp_avg_sq"], master["exp_avg_sq"] / s**2, rtol=1e-6, atol=0)
    head_before = model.lm_head.weight.detach().clone()
    train_steps(model, opt, [4])
    assert torch.equal(embed_adam.state[model.embed.weight]["step"], master["step"] + 1)
    assert not torch.equal(model.embed.weight, model.lm_head.weight)
    assert not torch.equal(model.lm_head.weight, head_before)


def test_tied_pair_is_refused_with_delayed_steps():
    """(Under torchrun the sharded and the FSDP optimizers train the pair: tests/test_distributed.py
    and tests/test_fsdp.py.)"""
    model = TiedModel()
    with pytest.raises(MuonGPTError, match="embed_head_every > 1 with a tied embedding"):
        build_optimizer(model, config("muon", embed_head_every=2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_side_optimizers_on_their_own_cuda_stream_step_as_one_after_another():
    """AdamW over the side groups runs on a second stream beside Muon: the same arithmetic,
    ordered after the gradients and before anything the main stream does next. Each stream is
    held up by a sleeping kernel, so a missing wait reads a gradient or a weight too early."""
    torch.manual_seed(0)
    model = TinyModel().cuda()
    ref = copy.deepcopy(model)
    opt = build_optimizer(model, config("muon", embed_head_every=2))
    ref_opt = build_optimizer(ref, config("muon", embed_head_every=2))
    ref_opt.side_stream = None  # one after another
    assert opt.side_stream is not None
    for s in range(5):
        seen = []
        for m, o in ((model, opt), (ref, ref_opt)):
            o.apply_schedule(lr_multiplier(s, 20, 2, 5, 0.1), muon_momentum(s, 0.85, 0.95, 300))
            m(*(t.cuda() for t in batch(s))).backward()
            torch.cuda._sleep(50_000_000)  # the main stream's gradients land late
            for p in m.parameters():
                if p.grad is not None:
                    p.grad.mul_(0.5)
            if o.side_stream is not None:
                with torch.cuda.stream(o.side_stream):
                    torch.cuda._sleep(50_000_000)  # and the side stream's updates
            o.step()
            seen.append([p.detach().clone() for p in m.parameters()])  # on the main stream
            o.zero_grad(set_to_none=True)
        for (n, _), a, b in zip(model.named_parameters(), *seen):
            assert torch.equal(a, b), (s, n)
    torch.cuda.synchronize()
