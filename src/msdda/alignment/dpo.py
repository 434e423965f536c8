"""Step-level DPO (MSDDA.md §5): train a single-objective policy whose reverse kernels prefer high step reward.

At a state x_t taken from the current policy's own (guided) sampling trajectories, draw `candidates`
x^1..x^K of x_{t-1} from the policy's kernel and score each by the step reward r_t (`StepTrainer.step_reward`:
by default the reward of the *reference* model's Tweedie estimate from x_{t-1}, clipped to [-1, 1]). With
the log-ratio g(x) = log pi(x|x_t) - log ref(x|x_t) (exact diagonal-Gaussian log-densities of the guided
kernels, mean and learned variance, in float64), `DPOConfig.labels` picks the loss:

* "bt" (default), Bradley-Terry soft labels on every pair (a, b) of the K candidates:
  h = beta * (g(x^a) - g(x^b)), y = sigmoid(r_a - r_b), L = -[y log sigmoid(h) + (1 - y) log sigmoid(-h)].
  Pair by pair the minimiser is h = r_a - r_b, i.e. pi = ref * exp(r_t / beta) / Z: the step optimum is the
  fixed point. (Labels sigmoid((r_a - r_b) / beta) with this loss would land on the optimum of beta², not beta.)
* "listwise": cross-entropy between softmax_i r_i and log_softmax_i beta * g(x^i) over the K candidates;
  minimised where beta * g = r + const, the same fixed point.
* "hard": the best and the worst candidate as a certain pair, L = -log sigmoid(beta * (g(x_w) - g(x_l)))
  (`dpo_loss`). It has NO Gibbs fixed point: the loss keeps falling as the gap grows, so where training stops
  is set by steps and learning rate, not by beta. Kept for the shipped digits models, which were made with it.

Every log row carries `calibration_slope`: the least-squares slope (through 0) of beta * (g(x^a) - g(x^b)) on
r_a - r_b over the step's pairs; 1 at the step optimum.
The final step (t -> -1) is never a state: the sampler returns the kernel mean there, so nothing is drawn.

`DPOTrainer` implements `collect` (states, candidates, best/worst pairs and reference log-densities of
one data shard) and `loss` on top of `msdda.alignment.trainer.StepTrainer`, which owns the loop,
checkpoints (resumable bit for bit), DDP data shards, logging and evaluation; `DPOConfig` beside it.
`train_dpo` is the one-call form.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from msdda.alignment.errors import AlignmentError
from msdda.alignment.trainer import (
    CondSampler,
    RewardFn,
    States,
    StepLoss,
    StepRewardFn,
    StepTrainer,
    StepTrainerConfig,
    TrainResult,
    check_reward_values,
    evaluate_policy,
    repeat_cond,
    shard_seed,
    shard_sizes,
)
from msdda.core.kernel import GaussianKernel
from msdda.core.samplers import SamplerKernelScheduler
from msdda.core.schedule import KernelScheduler
from msdda.distributed import DistContext

__all__ = [
    "LABEL_RULES",
    "DPOBatch",
    "DPOConfig",
    "DPOResult",
    "DPOTrainer",
    "bt_dpo_loss",
    "calibration_slope",
    "candidate_log_prob",
    "check_reward_values",
    "dpo_loss",
    "evaluate_policy",
    "listwise_dpo_loss",
    "pair_index",
    "shard_seed",
    "shard_sizes",
    "train_dpo",
]

LabelRule = Literal["bt", "listwise", "hard"]
LABEL_RULES: tuple[str, ...] = ("bt", "listwise", "hard")


@dataclass
class DPOConfig(StepTrainerConfig):
    """Step-level DPO. Round-trips through to_dict/from_dict; written beside every run.

    Fields of every step trainer: see `StepTrainerConfig` (reward, beta, steps, lr, trajectories,
    states_per_trajectory, guidance_scale, num_inference_steps, grad_clip, seed, checkpointing, logging,
    evaluation, LoRA, data_shards). data_shards=1 (default) is the single-stream recipe the shipped
    weights were trained with.
    candidates: draws K of x_{t-1} per state.
    labels: "bt" (default): Bradley-Terry soft labels sigmoid(r_a - r_b) on all K(K-1)/2 pairs, fixed point the
    step optimum ref * exp(r/beta) / Z; "listwise": softmax of rewards vs softmax of beta * log(pi/ref) over
    the K candidates, same fixed point; "hard": best vs worst as a certain pair (the shipped digits recipe),
    which has NO Gibbs fixed point: its loss keeps falling as the log-ratio gap grows, so the result depends
    on steps and learning rate rather than on beta.
    """

    candidates: int = 4
    labels: str = "bt"

    def validate(self) -> None:
        super().validate()
        if self.candidates < 2:
            raise AlignmentError(f"DPOConfig.candidates={self.candidates!r} must be >= 2 to form a pair")
        if self.labels not in LABEL_RULES:
            raise AlignmentError(
                f"DPOConfig.labels={self.labels!r} is not a label rule; choose one of {', '.join(LABEL_RULES)} "
                "(bt: Bradley-Terry soft labels, the default)"
            )


@dataclass
class DPOResult(TrainResult):
    """model: the trained policy (LoRA merged); history: the log rows; final_eval: last held-out figures."""


def dpo_loss(logp_w: Tensor, logref_w: Tensor, logp_l: Tensor, logref_l: Tensor, beta: float) -> Tensor:
    """Per-pair step-level DPO loss [N]: -log sigmoid(beta * ((lp_w - lr_w) - (lp_l - lr_l))). Inputs [N], nats.

    The hard-label loss: it has no finite minimiser (no Gibbs fixed point); see the module docstring."""
    return -F.logsigmoid(beta * ((logp_w - logref_w) - (logp_l - logref_l)))


def pair_index(k: int) -> tuple[Tensor, Tensor]:
    """The K(K-1)/2 unordered pairs (a, b), a < b, of K candidates: two index tensors [P]."""
    a, b = torch.triu_indices(k, k, offset=1)
    return a, b


def bt_dpo_loss(logratio: Tensor, rewards: Tensor, beta: float) -> Tensor:
    """Bradley-Terry step-level DPO loss per pair [N, P] (P = K(K-1)/2 pairs of each state's K candidates).

    logratio: [N, K] log pi(x^i|x_t) - log ref(x^i|x_t) in nats; rewards: [N, K] step rewards r_t(x^i).
    h = beta * (logratio_a - logratio_b), y = sigmoid(r_a - r_b), L = -[y log sigmoid(h) + (1-y) log sigmoid(-h)];
    minimised at h = r_a - r_b, i.e. at pi = ref * exp(r / beta) / Z.
    """
    a, b = pair_index(logratio.shape[1])
    h = beta * (logratio[:, a] - logratio[:, b])
    y = torch.sigmoid((rewards[:, a] - rewards[:, b]).to(h.dtype))
    return F.binary_cross_entropy_with_logits(h, y, reduction="none")


def listwise_dpo_loss(logratio: Tensor, rewards: Tensor, beta: float) -> Tensor:
    """Listwise step-level DPO loss per state [N]: cross-entropy of softmax_i r_i against
    log_softmax_i beta * logratio_i over the K candidates (inputs [N, K]); minimised where
    beta * logratio = r + const, i.e. at pi = ref * exp(r / beta) / Z."""
    target = torch.softmax(rewards.to(logratio.dtype), dim=1)
    return -(target * torch.log_softmax(beta * logratio, dim=1)).sum(1)


def calibration_slope(logratio: Tensor, rewards: Tensor, beta: float) -> Tensor:
    """Least-squares slope through 0 of beta * (logratio_a - logratio_b) on r_a - r_b over all pairs of each
    state's candidates (inputs [N, K]); 1 at the step optimum. 0-dim; nan when no pair's rewards differ."""
    num, den = calibration_sums(logratio, rewards, beta)
    return num / den if den > 0 else torch.full_like(num, float("nan"))


def calibration_sums(logratio: Tensor, rewards: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """(sum dr * beta * dg, sum dr^2) over all pairs, the two sums `calibration_slope` divides (0-dim each)."""
    a, b = pair_index(logratio.shape[1])
    dr = (rewards[:, a] - rewards[:, b]).double()
    dh = beta * (logratio[:, a] - logratio[:, b]).double()
    return (dr * dh).sum(), (dr * dr).sum()


def candidate_log_prob(kernel: GaussianKernel, candidates: Tensor) -> Tensor:
    """Log-densities [N, K] of candidates [N, K, ...] under a kernel over [N, ...] (one per state), nats."""
    var = kernel.var[:, None] if kernel.var.dim() > 0 else kernel.var
    return GaussianKernel(kernel.mean[:, None], var).log_prob(candidates, batch_dims=2)


@dataclass
class DPOBatch:
    """The no-gradient part of one data shard's step: states, candidates, rewards and reference log-densities.

    x_w / x_l (best / worst candidate) and their fields are filled for every label rule (they feed the logged
    figures); candidates, rewards and logref are filled for the soft rules ("bt", "listwise") only.
    """

    states: States
    x_w: Tensor  # [N, ...] winners
    x_l: Tensor  # [N, ...] losers
    logref_w: Tensor  # [N]
    logref_l: Tensor  # [N]
    valid: Tensor  # [N] bool: the pair's rewards differ
    gap: Tensor  # [N] reward gap max - min
    candidates: Tensor | None = None  # [N, K, ...] all candidates (soft labels)
    rewards: Tensor | None = None  # [N, K] their step rewards (soft labels)
    logref: Tensor | None = None  # [N, K] their reference log-densities (soft labels)


class DPOTrainer(StepTrainer[DPOConfig, DPOBatch]):
    """Step-level DPO on policy candidates with the label rule `config.labels` (see the module docstring).

    >>> trainer = DPOTrainer(policy, reference, scheduler, reward, DPOConfig(reward="ink"), out=run_dir,
    ...                      sample_shape=(1, 8, 8), cond_sampler=class_conditions, null_cond=null)
    >>> result = trainer.train()            # resumes from run_dir/checkpoints when possible
    """

    config_class: ClassVar[type[StepTrainerConfig]] = DPOConfig
    result_class: ClassVar[type[TrainResult]] = DPOResult

    def collect(self, shard: int) -> DPOBatch:
        """States, candidates, their step rewards and the best/worst pair of one data shard, from that shard's
        own generator (the same draws for every label rule)."""
        states = self.sample_states(shard)
        gen, k = self.generators[shard], self.config.candidates
        x, n = states.x, len(states)
        with torch.no_grad():
            pk = self.kernel(self.policy_guided, states)
            noise = torch.randn((n, k, *x.shape[1:]), generator=gen, dtype=torch.float64).to(x.device)
            cands = pk.mean[:, None] + pk.std[:, None] * noise  # [N, K, ...]
            flat = cands.reshape(n * k, *x.shape[1:])
            r = self.step_reward(flat, states.prev.repeat_interleave(k), repeat_cond(states.cond, k)).reshape(n, k)
            w_ix, l_ix = r.argmax(1), r.argmin(1)
            gap = r.max(1).values - r.min(1).values
            rows = torch.arange(n, device=r.device)
            x_w, x_l = cands[rows, w_ix], cands[rows, l_ix]
            rk = self.kernel(self.reference_guided, states)
            lr_w, lr_l = rk.log_prob(x_w), rk.log_prob(x_l)
            if self.config.labels == "hard":
                return DPOBatch(states, x_w, x_l, lr_w, lr_l, gap > 0, gap)
            logref = candidate_log_prob(rk, cands)
        return DPOBatch(states, x_w, x_l, lr_w, lr_l, gap > 0, gap, candidates=cands, rewards=r, logref=logref)

    def loss(self, batches: list[DPOBatch]) -> StepLoss:
        """Mean loss of the label rule over the global batch (under DDP too): hard labels over the pairs whose
        rewards differ, "bt" over all pairs, "listwise" over all states."""
        if self.config.labels != "hard":
            return self.soft_loss(batches)
        assert self.train_guided is not None
        lp_ws, lp_ls = [], []
        for b in batches:  # one forward per shard: the same batch shapes as on any other process count
            pk_grad = self.kernel(self.train_guided, b.states)
            lp_ws.append(pk_grad.log_prob(b.x_w))
            lp_ls.append(pk_grad.log_prob(b.x_l))
        lp_w, lp_l = torch.cat(lp_ws), torch.cat(lp_ls)
        lr_w, lr_l = torch.cat([b.logref_w for b in batches]), torch.cat([b.logref_l for b in batches])
        per_pair = dpo_loss(lp_w, lr_w, lp_l, lr_l, self.config.beta)
        weight = torch.cat([b.valid for b in batches]).double()
        gap = torch.cat([b.gap for b in batches])
        if self.ctx.distributed:
            # DDP averages gradients over ranks, so each rank's loss carries world_size / (global pair count)
            total = self.ctx.all_sum(weight.sum().reshape(1))[0].clamp_min(1.0)
            loss = (per_pair * weight).sum() * self.ctx.world_size / total
        else:
            loss = (per_pair * weight).sum() / weight.sum().clamp_min(1.0)
        parts = {"per_pair": per_pair, "weight": weight, "gap": gap, "ratio_w": lp_w - lr_w, "ratio_l": lp_l - lr_l}
        return StepLoss(loss=loss, parts=parts)

    def soft_loss(self, batches: list[DPOBatch]) -> StepLoss:
        """The "bt" / "listwise" loss over every candidate of this process's batches, normalised by the global
        number of terms (pairs for "bt", states for "listwise")."""
        assert self.train_guided is not None
        beta = self.config.beta
        ratios = []
        for b in batches:  # one forward per shard: the same batch shapes as on any other process count
            assert b.candidates is not None and b.logref is not None
            pk_grad = self.kernel(self.train_guided, b.states)
            ratios.append(candidate_log_prob(pk_grad, b.candidates) - b.logref)
        ratio = torch.cat(ratios)  # [N, K]
        rewards = torch.cat([b.rewards for b in batches if b.rewards is not None])
        if self.config.labels == "bt":
            terms = bt_dpo_loss(ratio, rewards, beta).flatten()  # [N * P]
        else:
            terms = listwise_dpo_loss(ratio, rewards, beta)  # [N]
        if self.ctx.distributed:
            # DDP averages gradients over ranks, so each rank's loss carries world_size / (global term count)
            total = self.ctx.all_sum(torch.tensor([float(terms.numel())], dtype=torch.float64))[0].clamp_min(1.0)
            loss = terms.sum() * self.ctx.world_size / total
        else:
            loss = terms.mean()
        rows = torch.arange(ratio.shape[0])
        w_ix, l_ix = rewards.argmax(1), rewards.argmin(1)
        gap = torch.cat([b.gap for b in batches])
        weight = torch.cat([b.valid for b in batches]).double()
        parts = {
            "terms": terms,
            "logratio": ratio,
            "rewards": rewards,
            "weight": weight,
            "gap": gap,
            "ratio_w": ratio[rows, w_ix],
            "ratio_l": ratio[rows, l_ix],
        }
        return StepLoss(loss=loss, parts=parts)

    def statistics(self, out: StepLoss) -> dict[str, float]:
        """loss, pair_accuracy (best-vs-worst margin > 0 among valid pairs), reward_gap, logratio_w, logratio_l
        and calibration_slope (slope of beta * delta-log-ratio on delta-r over the pairs; 1 at the optimum:
        all K(K-1)/2 pairs for soft labels, the best/worst pair for hard ones)."""
        p = out.parts
        weight, gap, ratio_w, ratio_l = p["weight"], p["gap"], p["ratio_w"], p["ratio_l"]
        margin = ratio_w - ratio_l
        beta = self.config.beta
        if "terms" in p:
            loss_sum, loss_count = p["terms"].sum(), float(p["terms"].numel())
            cal_num, cal_den = calibration_sums(p["logratio"], p["rewards"], beta)
        else:
            loss_sum, loss_count = (p["per_pair"] * weight).sum(), None
            cal_num, cal_den = (gap * beta * margin).sum(), (gap * gap).sum()
        n = torch.tensor(float(gap.numel()), dtype=torch.float64)
        sums = torch.stack(
            [
                loss_sum.double(),
                ((margin > 0).double() * weight).sum(),
                weight.sum(),
                gap.sum(),
                ratio_w.sum(),
                ratio_l.sum(),
                n,
                cal_num.double(),
                cal_den.double(),
                torch.tensor(loss_count if loss_count is not None else 0.0, dtype=torch.float64),
            ]
        )
        if self.ctx.distributed:  # figures of the global batch
            sums = self.ctx.all_sum(sums)
        pairs, count = sums[2].clamp_min(1.0), sums[6]
        if loss_count is not None:
            loss = float(sums[0] / sums[9].clamp_min(1.0))
        elif self.ctx.distributed:
            loss = float(sums[0] / pairs)
        else:
            loss = float(out.loss.detach())
        return {
            "loss": loss,
            "pair_accuracy": float(sums[1] / pairs),
            "reward_gap": float(sums[3] / count),
            "logratio_w": float(sums[4] / count),
            "logratio_l": float(sums[5] / count),
            "calibration_slope": float(sums[7] / sums[8]) if float(sums[8]) > 0 else float("nan"),
        }


def train_dpo(
    policy: nn.Module,
    reference: nn.Module,
    scheduler: KernelScheduler | SamplerKernelScheduler,
    reward: RewardFn,
    config: DPOConfig,
    *,
    out: Path,
    sample_shape: tuple[int, ...] | list[int],
    cond_sampler: CondSampler,
    null_cond: Tensor,
    resume: bool = True,
    progress: bool = True,
    throttle: float = 0.0,
    context: DistContext | None = None,
    step_reward: StepRewardFn | None = None,
    clip_samples: bool = True,
) -> DPOResult:
    """Train `policy` (initialised as a copy of `reference`) with step-level DPO: `DPOTrainer(...).train(...)`.

    policy, reference: denoisers `(x_t [B,C,...], t [B], cond [B]) -> [B, 2C, ...]` (eps + learned_range).
    reward: `(x0 [B,C,...] in [-1,1], cond [B]) -> [B]`, validated on every call.
    cond_sampler(n, generator) -> [n] conditions. out: run directory (train_log.jsonl, checkpoints/).
    resume: continue from the newest checkpoint in out/checkpoints (same config required).
    throttle: seconds to sleep per step (tests use it to interrupt a real run at a known point).
    context: the process's place in a multi-process run (default: `msdda.distributed.get_context()`, one
    process unless launched by torchrun / accelerate launch). Data shard d of every step goes to rank
    d % world_size, the policy is wrapped in DistributedDataParallel and the loss is normalised by the global
    pair count, so the gradients equal the single-process ones on the same global batch. Only rank 0 writes
    the log and the checkpoints; on the other ranks the result's history and final_eval are empty.
    step_reward, clip_samples: see `StepTrainer` (default: the reference's clipped Tweedie rule).
    """
    trainer = DPOTrainer(
        policy,
        reference,
        scheduler,
        reward,
        config,
        out=out,
        sample_shape=sample_shape,
        cond_sampler=cond_sampler,
        null_cond=null_cond,
        context=context,
        step_reward=step_reward,
        clip_samples=clip_samples,
    )
    result: Any = trainer.train(resume=resume, progress=progress, throttle=throttle)
    return result
