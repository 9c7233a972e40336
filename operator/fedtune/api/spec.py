"""The FederatedFineTune spec: one pydantic model is the source of the CLI's checks and the CRD schema.

Field names are camelCase on the wire (Kubernetes convention) and snake_case in Python.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from fedtune.api.rules import Rule, Violation, add_validations, unless
from fedtune.api.status import RunStatus

API_GROUP = "fedtune.io"
API_VERSION = "v1alpha1"
KIND = "FederatedFineTune"
PLURAL = "federatedfinetunes"

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# Path segments of DNS labels: no empty, "." or ".." segment can climb out of storage.uri.
RUN_ROOT = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(/[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
MAX_CLIENTS = 256
# `ed25519:` and the base64 of the 32-byte public key, as `fedtune keygen` prints it.
PUBLIC_KEY = r"^ed25519:[A-Za-z0-9+/]{43}=$"
# The label a Secret needs before a run may reference it: the operator reads no other Secret.
CREDENTIALS_LABEL = f"{API_GROUP}/credentials"
# Object stores fedtune can reach (fedtune.storage); a plain path is a local folder.
STORAGE_SCHEMES = ("s3", "file", "memory")


class SpecModel(BaseModel):
    """Base of every spec model: camelCase aliases, unknown fields rejected, values validated on set, and the
    model's cross-field `rules` checked here and written into its schema as CEL."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_assignment=True,
        use_enum_values=True,
        json_schema_extra=add_validations,
    )

    rules: ClassVar[tuple[Rule[Any], ...]] = ()

    @model_validator(mode="after")
    def _rules(self) -> Self:
        for rule in self.rules:
            rule.check(self)
        return self


def scheme_rule(field: str, uri: Callable[[Any], str | None], required: bool = True) -> Rule[Any]:
    """The URL in `field` names a scheme fedtune.storage serves, or none (a plain path)."""
    cel = f"!self.{field}.contains('://') || self.{field}.matches('^({'|'.join(STORAGE_SCHEMES)})://')"

    def find(model: Any) -> Violation | None:
        value = uri(model) or ""
        scheme = value.split("://", 1)[0] if "://" in value else None
        return unless(scheme is None or scheme in STORAGE_SCHEMES, f"found {scheme!r}")

    return Rule(
        field=field,
        message=f"unsupported storage scheme (supported: {', '.join(STORAGE_SCHEMES)}, or a plain path)",
        cel=cel if required else f"!has(self.{field}) || {cel}",
        find=find,
    )


class ModelSpec(SpecModel):
    """The base causal language model every client adapts, and where its weights come from.

    Exactly one source: a Hugging Face id (`name`), an object-store prefix (`uri`), a folder (`path`, on
    `volume` in a cluster) or a config to build random weights from (`config`, for tests and benchmarks).
    """

    name: str | None = Field(
        None,
        max_length=512,
        description="Pretrained model on the Hugging Face hub (e.g. meta-llama/Llama-3.2-1B), loaded with "
        "from_pretrained; a gated model needs tokenSecretRef.",
    )
    revision: str | None = Field(None, max_length=128, description="Revision (branch, tag or commit) of name.")
    token_secret_ref: str | None = Field(
        None,
        max_length=253,
        description="Secret with key HF_TOKEN, for a gated or private model on the hub; mounted into the run's "
        f"pods as HF_TOKEN only. Needs the label {CREDENTIALS_LABEL}.",
    )
    uri: str | None = Field(
        None,
        max_length=2048,
        description="Object-store prefix (s3://bucket/models/llama/ or file://) holding a model saved with "
        "save_pretrained and pushed with `fedtune model push`: downloaded once into the cache volume, each file "
        "checked against the pushed manifest, then loaded offline.",
    )
    sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description="sha256 of the manifest `fedtune model push` printed; required with uri: pins uri's model, so "
        "whoever can write the prefix cannot swap it.",
    )
    path: str | None = Field(
        None,
        max_length=1024,
        description="Folder with a model saved by save_pretrained: inside volume when volume is set, otherwise a "
        "local path (relative to the spec file). Loaded offline.",
    )
    volume: dict[str, Any] | None = Field(
        None,
        description="A Kubernetes volume source holding path (e.g. {persistentVolumeClaim: {claimName: models}}), "
        "mounted read-only into every pod of the run.",
    )
    cache: dict[str, Any] | None = Field(
        None,
        description="Volume source where uri's model is downloaded (default an emptyDir, so once per pod; a volume "
        "shared by the pods of a node makes it once per node).",
    )
    config: dict[str, Any] | None = Field(
        None,
        description="Build the model from this transformers config instead of pretrained weights "
        "(keys as in the config class, plus modelType, e.g. llama). Weights are initialised from seed.",
    )
    seed: int = Field(0, ge=0, description="Seed for the weights of a model built from config.")
    dtype: str = Field(
        "auto",
        pattern=r"^(auto|float32|bfloat16|float16)$",
        description="Precision of the frozen base model: auto is bfloat16 on a GPU that supports it and float32 "
        "otherwise. Adapter weights stay float32; on a GPU the forward pass runs under autocast in this dtype.",
    )
    attention: str = Field(
        "auto",
        pattern=r"^(auto|eager|sdpa|flash_attention_2)$",
        description="Attention implementation: auto is flash_attention_2 where flash-attn is installed and a GPU "
        "is used, otherwise sdpa.",
    )
    quantization: str | None = Field(
        None,
        pattern=r"^nf4$",
        description="nf4 loads the frozen base in 4 bits through bitsandbytes (QLoRA; needs a CUDA GPU and the "
        "bitsandbytes package in the image). Only LoRA-family methods train on a quantized base.",
    )

    rules = (
        Rule["ModelSpec"](
            field="",
            message="set exactly one of name (hub), uri (object store), path (folder or volume) or config",
            cel="[has(self.name), has(self.uri), has(self.path), has(self.config)].filter(x, x).size() == 1",
            find=lambda m: unless(sum(x is not None for x in (m.name, m.uri, m.path, m.config)) == 1),
        ),
        Rule["ModelSpec"](
            field="volume",
            message="volume holds the model's folder: set path with it",
            cel="!has(self.volume) || has(self.path)",
            find=lambda m: unless(m.volume is None or m.path is not None),
        ),
        Rule["ModelSpec"](
            field="tokenSecretRef",
            message="a token is for the hub: set name with it",
            cel="!has(self.tokenSecretRef) || has(self.name)",
            find=lambda m: unless(m.token_secret_ref is None or m.name is not None),
        ),
        Rule["ModelSpec"](
            field="revision",
            message="a revision is of a hub model: set name with it",
            cel="!has(self.revision) || has(self.name)",
            find=lambda m: unless(m.revision is None or m.name is not None),
        ),
        Rule["ModelSpec"](
            field="sha256",
            message="uri and sha256 go together: sha256 (printed by `fedtune model push`) pins the model at uri, "
            "so whoever can write that prefix cannot swap it",
            cel="has(self.sha256) == has(self.uri)",
            find=lambda m: unless((m.sha256 is None) == (m.uri is None)),
        ),
        Rule["ModelSpec"](
            field="cache",
            message="the cache holds a model downloaded from uri: set uri with it",
            cel="!has(self.cache) || has(self.uri)",
            find=lambda m: unless(m.cache is None or m.uri is not None),
        ),
        scheme_rule("uri", lambda m: m.uri, required=False),
    )


class TokenizerSpec(SpecModel):
    """How text becomes tokens; the builtin byte tokenizer needs no download."""

    name: str | None = Field(
        None, max_length=512, description="Pretrained tokenizer name or path; defaults to model.name."
    )
    builtin: str | None = Field(
        None,
        pattern=r"^bytes$",
        description="A tokenizer built locally: 'bytes' maps each UTF-8 byte to one token.",
    )

    rules = (
        Rule["TokenizerSpec"](
            field="",
            message="set at most one of name or builtin",
            cel="!has(self.name) || !has(self.builtin)",
            find=lambda t: unless(t.name is None or t.builtin is None),
        ),
    )


class PeftMethod(StrEnum):
    LORA = "lora"
    FFA_LORA = "ffa-lora"
    DORA = "dora"
    IA3 = "ia3"
    PROMPT_TUNING = "prompt-tuning"
    PREFIX_TUNING = "prefix-tuning"


# Methods that put low-rank A·B pairs on targetModules (and so can train on a 4-bit base, QLoRA).
LORA_FAMILY = frozenset({PeftMethod.LORA, PeftMethod.FFA_LORA, PeftMethod.DORA})


class PeftSpec(SpecModel):
    """The parameter-efficient adapter each client trains; only its weights ever travel.

    Every strategy aggregates every method: each method's trainable weights are a fixed set of tensors of
    one shape for all clients, initialised by the run's seed and reset to the global at each round.
    """

    method: PeftMethod = Field(
        PeftMethod.LORA,
        description="lora; ffa-lora (A frozen at its seeded init, only B trained and sent: averaging is then exact; "
        "recommended under differential privacy); dora (LoRA with a learned magnitude); ia3 (learned scaling "
        "vectors); prompt-tuning or prefix-tuning (learned virtual tokens).",
    )
    r: int = Field(8, ge=1, le=1024, description="LoRA rank.")
    alpha: int = Field(16, ge=1, le=4096, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[Annotated[str, Field(max_length=128)]] = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        min_length=1,
        max_length=64,
        description="Names of the modules that get adapters, e.g. q_proj, k_proj, v_proj, o_proj (lora, ffa-lora, "
        "dora, ia3).",
    )
    feedforward_modules: list[Annotated[str, Field(max_length=128)]] = Field(
        default_factory=list,
        max_length=64,
        description="ia3: the targetModules that are feed-forward layers (scaled on their input, not output).",
    )
    num_virtual_tokens: int = Field(
        16, ge=1, le=4096, description="prompt-tuning, prefix-tuning: learned tokens put before every input."
    )

    rules = (
        Rule["PeftSpec"](
            field="feedforwardModules",
            message="feed-forward modules are an ia3 setting and must be among targetModules",
            cel="!has(self.feedforwardModules) || size(self.feedforwardModules) == 0 || "
            "(has(self.method) && self.method == 'ia3' && "
            "self.feedforwardModules.all(m, has(self.targetModules) ? m in self.targetModules : "
            "m in ['q_proj', 'v_proj']))",
            find=lambda p: unless(
                not p.feedforward_modules
                or (p.method == PeftMethod.IA3 and set(p.feedforward_modules) <= set(p.target_modules))
            ),
        ),
    )


class DataFormat(StrEnum):
    TEXT = "text"
    PROMPT_RESPONSE = "prompt-response"
    CHAT = "chat"


class DataSpec(SpecModel):
    """A client's private data: JSONL read through the same storage layer as the rounds."""

    uri: str = Field(
        ...,
        min_length=1,
        max_length=2048,
        description="JSONL file: file://, s3://, memory:// URL or a path (relative to the spec file).",
    )
    format: DataFormat = Field(
        DataFormat.TEXT,
        description='text: lines {"text": ...}; prompt-response: lines {"prompt": ..., "response": ...}; '
        'chat: lines {"messages": [{"role": "system|user|assistant", "content": ...}]}, rendered with the '
        "tokenizer's chat template, loss on assistant turns only.",
    )
    template: str = Field(
        "{prompt}\n{response}",
        max_length=4096,
        description="How a prompt-response pair becomes text: {prompt} then {response}, once each, and {{ }} "
        "for literal braces; nothing else is substituted. Loss is taken from {response} on.",
        # The language _template_parts parses, for the API server, which cannot run Python.
        json_schema_extra={
            "pattern": r"^(?:[^{}]|\{\{|\}\})*\{prompt\}(?:[^{}]|\{\{|\}\})*\{response\}(?:[^{}]|\{\{|\}\})*$"
        },
    )
    max_examples: int = Field(
        100_000,
        ge=1,
        description="Read at most this many examples from each file (uri and evalUri); lines past it are not "
        "read. Memory grows with the tokens kept, not with the file.",
    )
    eval_fraction: float = Field(
        0.1, gt=0, lt=1, description="Share of the examples held out for evaluation (seeded split)."
    )
    eval_uri: str | None = Field(
        None, max_length=2048, description="A separate JSONL for evaluation; overrides evalFraction."
    )
    secret_ref: str | None = Field(
        None,
        max_length=253,
        description="Secret with the credentials for this data (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
        "optionally AWS_ENDPOINT_URL); mounted into this client's pod only. Needs the label "
        f"{CREDENTIALS_LABEL}.",
    )

    rules = (
        scheme_rule("uri", lambda d: d.uri),
        scheme_rule("evalUri", lambda d: d.eval_uri, required=False),
    )

    @field_validator("template")
    @classmethod
    def _valid_template(cls, value: str) -> str:
        cls._template_parts(value)
        return value

    def template_parts(self) -> tuple[str, str, str]:
        """(before, between, after): the text is before + prompt + between + response + after."""
        return self._template_parts(self.template)

    @staticmethod
    def _template_parts(text: str) -> tuple[str, str, str]:
        """A scanner, not str.format: format specs, conversions and field access would let a template
        allocate without bound or reach attributes, so only the two names are placeholders."""
        parts, names, i = [""], [], 0
        while i < len(text):
            pair = text[i : i + 2]
            if pair in ("{{", "}}"):
                parts[-1] += pair[0]
                i += 2
            elif pair[0] == "}":
                raise ValueError(f"unbalanced }} at character {i + 1}; write }}}} for a literal brace")
            elif pair[0] == "{":
                end = text.find("}", i)
                if end < 0:
                    raise ValueError(f"unbalanced {{ at character {i + 1}; write {{{{ for a literal brace")
                name = text[i + 1 : end]
                if name not in ("prompt", "response"):
                    shown = name[:40].encode("unicode_escape").decode()
                    raise ValueError(f"unknown placeholder {{{shown}}}; only {{prompt}} and {{response}} are allowed")
                names.append(name)
                parts.append("")
                i = end + 1
            else:
                parts[-1] += pair[0]
                i += 1
        if sorted(names) != ["prompt", "response"]:
            found = ", ".join(f"{{{n}}}" for n in names) or "none"
            raise ValueError(f"needs {{prompt}} and then {{response}}, once each (found: {found})")
        if names[0] == "response":
            raise ValueError("{response} must come after {prompt}: the prompt is everything before {response}")
        return parts[0], parts[1], parts[2]


class ResourcesSpec(SpecModel):
    """Compute a client or the aggregator asks for."""

    gpus: int = Field(0, ge=0, le=64, description="nvidia.com/gpu count.")
    cpu: str = Field("1", max_length=32, description="CPU request and limit, Kubernetes quantity.")
    memory: str = Field("4Gi", max_length=32, description="Memory request and limit, Kubernetes quantity.")


class Toleration(SpecModel):
    """A Kubernetes toleration."""

    key: str | None = Field(None, max_length=253, description="Taint key.")
    operator: str = Field("Equal", pattern=r"^(Equal|Exists)$", description="Equal or Exists.")
    value: str | None = Field(None, max_length=253, description="Taint value.")
    effect: str | None = Field(None, pattern=r"^(NoSchedule|PreferNoSchedule|NoExecute)$", description="Taint effect.")


class PlacementSpec(SpecModel):
    """Where a pod may run: its GPU node pool."""

    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Compute requested.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the pod needs.")
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32, description="Taints the pod tolerates.")
    affinity: dict[str, Any] | None = Field(None, description="A Kubernetes affinity, passed as is.")


class PartySpec(PlacementSpec):
    """A party of the run (the aggregator or one client): its pod, its storage identity, its signing key."""

    secret_ref: str | None = Field(
        None,
        max_length=253,
        description="Secret with this party's own storage credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
        "optionally AWS_ENDPOINT_URL); defaults to storage.secretRef. Mounted into this party's pod only. "
        f"Needs the label {CREDENTIALS_LABEL}.",
    )
    public_key: str | None = Field(
        None,
        pattern=PUBLIC_KEY,
        description="This party's Ed25519 public key (ed25519:<base64>, from `fedtune keygen`), pinned here so "
        "nobody with bucket access can replace it. Unset: the operator generates a key pair for the run.",
    )
    signing_key_secret_ref: str | None = Field(
        None,
        max_length=253,
        description="Secret holding the private key that matches publicKey (key signing.key, PEM); mounted "
        f"into this party's pod only. Needs the label {CREDENTIALS_LABEL}.",
    )

    rules: ClassVar[tuple[Rule[Any], ...]] = (
        Rule["PartySpec"](
            field="publicKey",
            message="publicKey and signingKeySecretRef go together: the Secret holds the private half of the key",
            cel="has(self.publicKey) == has(self.signingKeySecretRef)",
            find=lambda p: unless((p.public_key is None) == (p.signing_key_secret_ref is None)),
        ),
    )


_EXTERNAL = "(has(self.external) && self.external)"


class ClientSpec(PartySpec):
    """One data owner (silo): its data and where its trainer runs."""

    name: str = Field(
        ...,
        min_length=1,
        max_length=40,
        pattern=DNS_LABEL,
        description="Client name, a DNS label unique in the run.",
    )
    data: DataSpec = Field(..., description="The client's private training data.")
    weight: float | None = Field(
        None, gt=0, description="Aggregation weight; defaults to the number of training examples."
    )
    external: bool = Field(
        False,
        description="The client runs in its owner's cluster (a FederatedClient there), meeting the run only in "
        "storage: the operator creates no pod for it. It brings its own key: set publicKey, and leave its "
        "Secrets (secretRef, signingKeySecretRef, data.secretRef) to its own cluster.",
    )

    rules: ClassVar[tuple[Rule[Any], ...]] = (
        Rule["ClientSpec"](
            field="publicKey",
            message="publicKey and signingKeySecretRef go together: the Secret holds the private half of the key",
            cel=f"{_EXTERNAL} || has(self.publicKey) == has(self.signingKeySecretRef)",
            find=lambda c: unless(c.external or (c.public_key is None) == (c.signing_key_secret_ref is None)),
        ),
        Rule["ClientSpec"](
            field="publicKey",
            message="an external client signs with a key of its own: set its publicKey (its cluster keeps the "
            "private half)",
            cel=f"!{_EXTERNAL} || has(self.publicKey)",
            find=lambda c: unless(not c.external or c.public_key is not None),
        ),
        Rule["ClientSpec"](
            field="external",
            message="an external client's Secrets live in its own cluster: leave secretRef, signingKeySecretRef and "
            "data.secretRef unset here (they belong in its FederatedClient)",
            cel=f"!{_EXTERNAL} || (!has(self.secretRef) && !has(self.signingKeySecretRef) && "
            "!has(self.data.secretRef))",
            find=lambda c: unless(
                not c.external or (c.secret_ref is None and c.signing_key_secret_ref is None and not c.data.secret_ref)
            ),
        ),
    )


class AggregatorSpec(PartySpec):
    """Where the aggregator runs, and its identity."""


class LrSchedule(StrEnum):
    CONSTANT = "constant"
    COSINE = "cosine"


class TrainingSpec(SpecModel):
    """Local training each selected client runs per round."""

    local_steps: int = Field(10, ge=1, le=100_000, description="Optimizer steps per client per round.")
    batch_size: int = Field(8, ge=1, le=4096, description="Examples per micro-batch.")
    gradient_accumulation: int = Field(
        1, ge=1, le=4096, description="Micro-batches per optimizer step: a step sees batchSize × this examples."
    )
    learning_rate: float = Field(1e-3, gt=0, le=10, description="AdamW peak learning rate.")
    lr_schedule: LrSchedule = Field(
        LrSchedule.CONSTANT,
        description="constant, or cosine: linear warm-up over warmupSteps, then cosine decay to zero over the "
        "whole run (rounds × localSteps), continued across rounds.",
    )
    warmup_steps: int = Field(0, ge=0, description="Steps of linear warm-up at the start of the run.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_length: int = Field(256, ge=8, le=131_072, description="Tokens per example after truncation.")
    packing: bool = Field(
        False,
        description="text data: concatenate examples (each ended by eos) and cut them into maxLength blocks, so no "
        "step computes on padding.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, about a third more compute."
    )
    keep_optimizer_state: bool = Field(
        False,
        description="Keep each client's AdamW moments from round to round, in the client's own prefix (signed). "
        "Off: every round starts AdamW afresh.",
    )
    max_grad_norm: float | None = Field(1.0, gt=0, description="Per-step gradient clipping; null disables.")
    eval_batches: int = Field(8, ge=1, description="At most this many batches of the eval split are scored.")


# What spec.aggregation.strategy may name (a docstring here would replace the field's description in the
# CRD); fedtune.aggregation.Strategy is the implementation.
class StrategyName(StrEnum):
    FEDAVG = "fedavg"
    FEDAVGM = "fedavgm"
    FEDPROX = "fedprox"
    FEDADAM = "fedadam"
    FEDYOGI = "fedyogi"
    FEDADAGRAD = "fedadagrad"
    FEDMEDIAN = "fedmedian"
    TRIMMEDMEAN = "trimmedmean"
    KRUM = "krum"
    MULTIKRUM = "multikrum"
    BULYAN = "bulyan"


# Distance-based strategies need this many updates for f = byzantineClients (Blanchard et al. 2017;
# El Mhamdi et al. 2018): a round may close with minClients updates, so minClients must reach it.
BYZANTINE_MINIMUM = {"krum": (2, 3), "multikrum": (2, 3), "bulyan": (4, 3)}
# The coordinator's party name: a client may not take it (bucket policies and keys are per party name).
RESERVED_CLIENT_NAME = "aggregator"

# Strategies whose result is a function of the (weighted) mean update alone: only these compose with
# client-level differential privacy, which noises that mean.
MEAN_BASED = frozenset(
    {
        StrategyName.FEDAVG,
        StrategyName.FEDAVGM,
        StrategyName.FEDPROX,
        StrategyName.FEDADAM,
        StrategyName.FEDYOGI,
        StrategyName.FEDADAGRAD,
    }
)


class Encoding(StrEnum):
    FP32 = "fp32"
    BF16 = "bf16"
    INT8 = "int8"
    INT8_CHANNEL = "int8-channel"


class AggregationSpec(SpecModel):
    """How rounds run and how client updates are combined."""

    strategy: StrategyName = Field(StrategyName.FEDAVG, description="Aggregation strategy.")
    rounds: int = Field(5, ge=1, le=100_000, description="Number of federated rounds.")
    clients_per_round: int | None = Field(
        None, ge=1, le=MAX_CLIENTS, description="Clients sampled each round; defaults to all clients."
    )
    min_clients: int = Field(
        1,
        ge=1,
        le=MAX_CLIENTS,
        description="Valid updates a round needs before it may close at its deadline.",
    )
    round_timeout_seconds: float = Field(
        600, gt=0, description="After this, a round closes with the updates it has (at least minClients)."
    )
    server_learning_rate: float = Field(1.0, gt=0, description="Server step size (fedavgm, fedadam, ...).")
    server_momentum: float = Field(0.9, ge=0, lt=1, description="fedavgm momentum; fedadam/fedyogi/fedadagrad beta1.")
    beta2: float = Field(0.99, ge=0, lt=1, description="fedadam/fedyogi second-moment decay.")
    tau: float = Field(1e-3, gt=0, description="fedadam/fedyogi/fedadagrad adaptivity (epsilon).")
    proximal_mu: float = Field(0.01, ge=0, description="fedprox: weight of the proximal term mu/2·||w − w_global||².")
    trim_fraction: float = Field(0.1, ge=0, lt=0.5, description="trimmedmean: share cut from each end.")
    byzantine_clients: int = Field(0, ge=0, description="krum, multikrum, bulyan: assumed bad clients f.")
    max_update_norm: float | None = Field(
        None, gt=0, description="Updates with a larger L2 norm are rejected; null disables the bound."
    )
    encoding: Encoding = Field(Encoding.FP32, description="How clients encode uploads: fp32, bf16, int8, int8-channel.")
    max_failed_rounds: int = Field(
        3,
        ge=0,
        le=1000,
        description="A round whose time runs out with fewer than minClients valid updates fails: the global is "
        "kept and the round retried with a fresh sample. The run fails after this many failed rounds in a row.",
    )
    over_selection: int = Field(
        0,
        ge=0,
        le=MAX_CLIENTS,
        description="Select this many clients beyond clientsPerRound; the first clientsPerRound valid updates win, "
        "so a round does not wait for stragglers.",
    )


class PrivacySpec(SpecModel):
    """Client-level differential privacy (DP-FedAvg): clipping, Gaussian noise, an accountant."""

    enabled: bool = Field(False, description="Turn client-level differential privacy on.")
    clip_norm: float = Field(
        1.0, gt=0, description="Each update is clipped to this L2 norm (initial value if adaptive)."
    )
    adaptive_clipping: bool = Field(False, description="Track a quantile of update norms (Andrew et al. 2019).")
    target_quantile: float = Field(0.5, gt=0, lt=1, description="Adaptive clipping: quantile of norms to track.")
    clip_learning_rate: float = Field(0.2, gt=0, description="Adaptive clipping: geometric step size.")
    noise_multiplier: float = Field(1.0, ge=0, description="Noise std as a multiple of the clip norm.")
    delta: float = Field(1e-5, gt=0, lt=1, description="delta of (epsilon, delta)-DP.")
    target_epsilon: float | None = Field(
        None, gt=0, description="End the run before a round would push epsilon past this."
    )


class StorageSpec(SpecModel):
    """The object store where rounds meet: the only thing silos need to reach."""

    uri: str = Field(
        "file://./fedtune-runs",
        min_length=1,
        max_length=2048,
        description="Root URL of the run store: s3://bucket/prefix, file:///path, memory://name.",
    )
    endpoint: str | None = Field(
        None,
        max_length=2048,
        description="S3 endpoint URL for S3-compatible servers (MinIO, versitygw, ...).",
    )
    region: str | None = Field(None, max_length=64, description="S3 region.")
    secret_ref: str | None = Field(
        None,
        max_length=253,
        description="Default storage credentials of every party without its own secretRef (a single-team run): "
        "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, optionally AWS_ENDPOINT_URL. Needs the label "
        f"{CREDENTIALS_LABEL}.",
    )
    keep: bool = Field(True, description="Keep the run's objects when the resource is deleted.")
    run_root: str | None = Field(
        None,
        max_length=512,
        pattern=RUN_ROOT,
        description="Where the run's objects go under uri, in place of {namespace}/{name}-{uid}: a location "
        "that clients in other clusters can be given before the run exists. One run per runRoot.",
    )

    rules = (scheme_rule("uri", lambda s: s.uri),)


_DP_ON = "(has(self.privacy) && has(self.privacy.enabled) && self.privacy.enabled)"


def _unset_in_aggregation(field: str) -> str:
    return f"(!has(self.aggregation) || !has(self.aggregation.{field}))"


def _in_aggregation(field: str, default: int) -> str:
    return f"(has(self.aggregation) && has(self.aggregation.{field}) ? self.aggregation.{field} : {default})"


def byzantine_rule(strategy: str, a: int, b: int) -> Rule[FederatedFineTuneSpec]:
    """A distance-based strategy needs a*f + b updates in every round it may close (f = byzantineClients)."""

    def find(spec: FederatedFineTuneSpec) -> Violation | None:
        agg = spec.aggregation
        need = a * agg.byzantine_clients + b
        return unless(
            agg.strategy != strategy or agg.min_clients >= need,
            f"byzantineClients={agg.byzantine_clients} needs at least {need} updates in a round; "
            f"minClients is {agg.min_clients}",
        )

    return Rule(
        field="aggregation.minClients",
        message=f"{strategy} needs minClients >= {a}*byzantineClients + {b}",
        cel=f"{_unset_in_aggregation('strategy')} || self.aggregation.strategy != '{strategy}' || "
        f"{_in_aggregation('minClients', 1)} >= {a} * {_in_aggregation('byzantineClients', 0)} + {b}",
        find=find,
    )


def at_most_clients(field: str, value: Callable[[AggregationSpec], int | None]) -> Rule[FederatedFineTuneSpec]:
    """aggregation.<field>, where set, is no more than the clients there are."""

    def find(spec: FederatedFineTuneSpec) -> Violation | None:
        n = value(spec.aggregation)
        return unless(n is None or n <= len(spec.clients), f"{field} is {n}, with {len(spec.clients)} clients")

    return Rule(
        field=f"aggregation.{field}",
        message="must not exceed the number of clients",
        cel=f"{_unset_in_aggregation(field)} || self.aggregation.{field} <= size(self.clients)",
        find=find,
    )


def duplicate_client(clients: list[ClientSpec]) -> Violation | None:
    """The first client whose name an earlier client already has."""
    first: dict[str, int] = {}
    for i, c in enumerate(clients):
        if c.name in first:
            return Violation(f"clients[{i}].name", f"{c.name!r} is also clients[{first[c.name]}].name")
        first[c.name] = i
    return None


class FederatedFineTuneSpec(SpecModel):
    """What to fine-tune, on whose data, and how the federation runs."""

    model: ModelSpec = Field(..., description="The base model.")
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec, description="The tokenizer.")
    peft: PeftSpec = Field(default_factory=PeftSpec, description="The adapter trained by clients.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Local training per round.")
    aggregation: AggregationSpec = Field(default_factory=AggregationSpec, description="Rounds and aggregation.")
    privacy: PrivacySpec = Field(default_factory=PrivacySpec, description="Differential privacy.")
    storage: StorageSpec = Field(default_factory=StorageSpec, description="The object store.")
    clients: list[ClientSpec] = Field(
        ..., min_length=1, max_length=MAX_CLIENTS, description="The data owners taking part."
    )
    aggregator: AggregatorSpec = Field(default_factory=AggregatorSpec, description="The aggregator's pod.")
    image: str = Field(
        "ghcr.io/fedtune/trainer:0.1.0",
        max_length=512,
        description="Image of the aggregator and client pods.",
    )
    seed: int = Field(
        0, ge=0, description="Seeds client sampling, data order and adapter init (never the privacy noise)."
    )
    suspend: bool = Field(False, description="Remove the pods and hold the run; unsuspended, it resumes.")
    queue_name: str | None = Field(
        None,
        max_length=63,
        pattern=DNS_LABEL,
        description="Kueue LocalQueue in the run's namespace. The run is admitted as one gang: its Jobs are "
        "created suspended and start together, the aggregator and every client, once Kueue admits them all.",
    )
    active_deadline_seconds: int | None = Field(None, ge=1, description="Fail the run after this long.")
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, description="Delete the resource this long after it finished."
    )
    backoff_limit: int = Field(3, ge=0, le=100, description="Restarts of a failing client before it is dropped.")

    rules = (
        Rule["FederatedFineTuneSpec"](
            field="clients",
            # No FieldValueDuplicate reason: the API server would print "Duplicate value" and drop the message.
            message="client names must be unique",
            cel="self.clients.all(c, self.clients.exists_one(d, d.name == c.name))",
            cel_message="'duplicate client name \"' + self.clients.map(c, c.name)"
            ".filter(n, self.clients.filter(d, d.name == n).size() > 1)[0] + '\"'",
            find=lambda s: duplicate_client(s.clients),
        ),
        Rule["FederatedFineTuneSpec"](
            field="clients",
            message=f"{RESERVED_CLIENT_NAME!r} is the coordinator's party name; choose another client name",
            cel=f"self.clients.all(c, c.name != '{RESERVED_CLIENT_NAME}')",
            find=lambda s: next(
                (Violation(f"clients[{i}].name") for i, c in enumerate(s.clients) if c.name == RESERVED_CLIENT_NAME),
                None,
            ),
        ),
        Rule["FederatedFineTuneSpec"](
            field="aggregation.maxUpdateNorm",
            message="under differential privacy every update is clipped to privacy.clipNorm: leave maxUpdateNorm "
            "unset (rejecting on the norm would release, un-noised, whether a client's update exceeded it)",
            cel=f"!{_DP_ON} || !has(self.aggregation) || !has(self.aggregation.maxUpdateNorm)",
            find=lambda s: unless(not s.privacy.enabled or s.aggregation.max_update_norm is None),
        ),
        Rule["FederatedFineTuneSpec"](
            field="privacy.enabled",
            message="differential privacy noises the mean update: it needs a mean-based strategy ("
            + ", ".join(sorted(MEAN_BASED))
            + ")",
            cel=f"!{_DP_ON} || !has(self.aggregation) || !has(self.aggregation.strategy) || "
            f"self.aggregation.strategy in {sorted(str(s) for s in MEAN_BASED)}",
            find=lambda s: unless(
                not s.privacy.enabled or s.aggregation.strategy in MEAN_BASED, f"strategy is {s.aggregation.strategy}"
            ),
        ),
        *(byzantine_rule(strategy, a, b) for strategy, (a, b) in BYZANTINE_MINIMUM.items()),
        at_most_clients("minClients", lambda a: a.min_clients),
        at_most_clients("clientsPerRound", lambda a: a.clients_per_round),
        Rule["FederatedFineTuneSpec"](
            field="aggregation.overSelection",
            message="clientsPerRound + overSelection must not exceed the number of clients",
            cel=f"{_unset_in_aggregation('clientsPerRound')} || self.aggregation.clientsPerRound + "
            f"{_in_aggregation('overSelection', 0)} <= size(self.clients)",
            find=lambda s: unless(
                s.aggregation.clients_per_round is None
                or s.aggregation.clients_per_round + s.aggregation.over_selection <= len(s.clients),
                f"{s.aggregation.clients_per_round} + {s.aggregation.over_selection}, with {len(s.clients)} clients",
            ),
        ),
        Rule["FederatedFineTuneSpec"](
            field="aggregation.minClients",
            message="must not exceed clientsPerRound",
            cel=f"{_unset_in_aggregation('clientsPerRound')} || "
            f"{_in_aggregation('minClients', 1)} <= self.aggregation.clientsPerRound",
            find=lambda s: unless(
                s.aggregation.clients_per_round is None or s.aggregation.min_clients <= s.aggregation.clients_per_round,
                f"minClients is {s.aggregation.min_clients}, clientsPerRound {s.aggregation.clients_per_round}",
            ),
        ),
        Rule["FederatedFineTuneSpec"](
            field="training.keepOptimizerState",
            message="under differential privacy a client keeps no optimizer state between rounds: its un-noised "
            "moments would sit in storage the aggregator can read",
            cel=f"!{_DP_ON} || !has(self.training) || !has(self.training.keepOptimizerState) || "
            "!self.training.keepOptimizerState",
            find=lambda s: unless(not s.privacy.enabled or not s.training.keep_optimizer_state),
        ),
        Rule["FederatedFineTuneSpec"](
            field="training.packing",
            message="packing joins plain text: every client's data.format must be text",
            cel="!has(self.training) || !has(self.training.packing) || !self.training.packing || "
            "self.clients.all(c, !has(c.data.format) || c.data.format == 'text')",
            find=lambda s: next(
                (
                    Violation("training.packing", f"clients[{i}].data.format is {c.data.format}")
                    for i, c in enumerate(s.clients)
                    if s.training.packing and c.data.format != DataFormat.TEXT
                ),
                None,
            ),
        ),
        Rule["FederatedFineTuneSpec"](
            field="model.quantization",
            message="a quantized (4-bit) base trains only LoRA-family adapters (lora, ffa-lora, dora)",
            cel="!has(self.model.quantization) || !has(self.peft) || !has(self.peft.method) || "
            f"self.peft.method in {sorted(str(m) for m in LORA_FAMILY)}",
            find=lambda s: unless(
                s.model.quantization is None or s.peft.method in LORA_FAMILY, f"peft.method is {s.peft.method}"
            ),
        ),
    )

    def parties(self) -> list[tuple[str, PartySpec]]:
        """(field path, party) of the aggregator and every client."""
        return [("spec.aggregator", self.aggregator), *((f"spec.clients[{i}]", c) for i, c in enumerate(self.clients))]

    def secret_refs(self) -> list[tuple[str, str]]:
        """(field path, Secret name) of every Secret the run references."""
        refs = [
            ("spec.storage.secretRef", self.storage.secret_ref),
            ("spec.model.tokenSecretRef", self.model.token_secret_ref),
        ]
        for path, party in self.parties():
            refs += [
                (f"{path}.secretRef", party.secret_ref),
                (f"{path}.signingKeySecretRef", party.signing_key_secret_ref),
            ]
        refs += [(f"spec.clients[{i}].data.secretRef", c.data.secret_ref) for i, c in enumerate(self.clients)]
        return [(path, name) for path, name in refs if name]

    @property
    def clients_per_round(self) -> int:
        return self.aggregation.clients_per_round or len(self.clients)

    def client(self, name: str) -> ClientSpec:
        for c in self.clients:
            if c.name == name:
                return c
        raise KeyError(name)


class ObjectMeta(BaseModel):
    """The part of Kubernetes metadata a run needs."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(..., min_length=1, max_length=63, pattern=DNS_LABEL)
    namespace: str = "default"
    uid: str | None = None


class Resource(BaseModel):
    """What every object of fedtune's API group has, as kubectl sends it."""

    model_config = ConfigDict(extra="forbid")

    api_version: str = Field(f"{API_GROUP}/{API_VERSION}", alias="apiVersion", pattern=rf"^{API_GROUP}/")
    metadata: ObjectMeta


class FederatedFineTune(Resource):
    """A whole resource as kubectl sends it."""

    kind: str = Field(KIND, pattern=rf"^{KIND}$")
    spec: FederatedFineTuneSpec
    status: RunStatus | None = None
