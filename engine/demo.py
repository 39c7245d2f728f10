"""The embedded demo model: a small random-weight LLaMA, a byte-fallback tokenizer that covers Chinese, and
the two ChatMed LoRA adapters, built deterministically into a cache folder.

Its answers are noise. It exists so that the server starts with no downloaded weights and the tests have a
real Hugging Face checkpoint (config.json, safetensors, tokenizer files, PEFT adapters) to load.

Layout: `<cache_dir>/demo-<key>/{base, adapters/chatmed-consult, adapters/chatmed-tcm}`, where the key
hashes the spec and FORMAT_VERSION. A folder is built under a temporary name and renamed when complete, so
a folder with the final name is always whole and is reused as it is.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from peft import PeftModel
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, PreTrainedModel

logger = logging.getLogger(__name__)

# Bump whenever the files written here change, so that stale cache folders are not reused.
FORMAT_VERSION = 2
CACHE_DIR_ENV = "CHATMED_CACHE_DIR"
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# (name, rank) of the real ChatMed adapters (see CHATMED.md); both use lora_alpha=32 and dropout 0.1.
DEMO_ADAPTERS = (("chatmed-consult", 8), ("chatmed-tcm", 16))
DEMO_LORA_ALPHA = 32

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
SPACE = "▁"  # SentencePiece's stand-in for a space

_EMBED_STD = 1.0
_LM_HEAD_GAIN = 2.0
# Each LoRA delta is about this fraction of its base projection's output: big enough to move the logits
# clearly, small enough that the adapted model is as sane as the base.
_LORA_STRENGTH = 0.3
_NUM_HANZI = 3500
# Hanzi beyond the embedded lists are taken at this stride through the CJK block, so that the rest of the
# block (including some real words' characters) goes through byte fallback, as on a real LLaMA vocab.
_HANZI_FILL_STRIDE = 7
_CJK_FIRST, _CJK_LAST = 0x4E00, 0x9FA5


@dataclass(frozen=True)
class DemoSpec:
    """Sizes and seed of a demo LLaMA. The cache folder name is a hash of these fields."""

    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 4  # fewer than num_heads: grouped-query attention is always exercised
    intermediate_size: int = 688
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        sizes = (self.hidden_size, self.num_layers, self.num_heads, self.num_kv_heads, self.intermediate_size)
        if min(sizes) < 1 or self.max_position_embeddings < 2:
            raise ValueError(f"demo sizes must be positive: {self}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must divide by num_heads, and num_heads by num_kv_heads")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError("the head dimension must be even for rotary embeddings")

    @classmethod
    def tiny(cls) -> DemoSpec:
        """For unit tests: builds in about a second."""
        return cls(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)

    @classmethod
    def bench(cls) -> DemoSpec:
        """For CPU benchmarks: about 20M parameters."""
        return cls(hidden_size=512, num_layers=6, num_heads=8, num_kv_heads=4, intermediate_size=1152)

    @property
    def key(self) -> str:
        """A short hash of the spec and FORMAT_VERSION: the cache folder is `demo-<key>`."""
        text = json.dumps({"format": FORMAT_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def num_parameters(self) -> int:
        """Parameters of the base model (embeddings and lm_head included)."""
        vocab_size = len(_vocab_and_merges()[0])
        head_dim = self.hidden_size // self.num_heads
        attention = (
            2 * self.hidden_size * self.hidden_size + 2 * self.hidden_size * self.num_kv_heads * head_dim
        )
        layer = attention + 3 * self.hidden_size * self.intermediate_size + 2 * self.hidden_size
        heads = 1 if self.tie_word_embeddings else 2
        return heads * vocab_size * self.hidden_size + self.num_layers * layer + self.hidden_size


@dataclass(frozen=True)
class DemoModel:
    """A built demo: the base checkpoint folder and each adapter's folder by served name."""

    base_path: Path
    adapters: dict[str, Path]


def default_cache_dir() -> Path:
    """$CHATMED_CACHE_DIR, else ~/.cache/chatmed-serve."""
    configured = os.environ.get(CACHE_DIR_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "chatmed-serve"


def build_demo(spec: DemoSpec | None = None, cache_dir: Path | None = None) -> DemoModel:
    """Return the demo model of `spec` under `cache_dir`, building it first if it is not there yet.

    Safe against concurrent and interrupted builds: the folder appears, complete, by one rename.
    """
    spec = spec or DemoSpec()
    root = cache_dir if cache_dir is not None else default_cache_dir()
    final = root / f"demo-{spec.key}"
    if final.is_dir():
        return _demo_model(final)
    root.mkdir(parents=True, exist_ok=True)
    logger.info("building demo model into %s (random weights: its answers are noise)", final)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
    try:
        _build_into(staging, final, spec)
        try:
            staging.rename(final)
        except OSError:
            # Another process finished the same build first; its folder is identical to ours.
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _demo_model(final)


def _demo_model(folder: Path) -> DemoModel:
    return DemoModel(
        base_path=folder / "base",
        adapters={name: folder / "adapters" / name for name, _ in DEMO_ADAPTERS},
    )


def _build_into(folder: Path, final: Path, spec: DemoSpec) -> None:
    base = folder / "base"
    build_tokenizer(base, model_max_length=spec.max_position_embeddings)
    _build_base(base, spec)
    for offset, (name, rank) in enumerate(DEMO_ADAPTERS, start=1):
        make_adapter(
            base,
            folder / "adapters" / name,
            r=rank,
            lora_alpha=DEMO_LORA_ALPHA,
            seed=spec.seed + offset,
            # The adapters must name the base where it will live, not the staging folder.
            base_model_name_or_path=str(final / "base"),
        )


class LlamaShape(Protocol):
    """The sizes a LLaMA config needs (DemoSpec has them; so do the benchmarks' model shapes)."""

    @property
    def hidden_size(self) -> int: ...
    @property
    def intermediate_size(self) -> int: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def num_heads(self) -> int: ...
    @property
    def num_kv_heads(self) -> int: ...
    @property
    def max_position_embeddings(self) -> int: ...
    @property
    def rope_theta(self) -> float: ...
    @property
    def rms_norm_eps(self) -> float: ...


def llama_config(
    shape: LlamaShape,
    *,
    vocab_size: int,
    special_ids: tuple[int | None, int | None, int | None],
    tie_word_embeddings: bool,
    dtype: str,
) -> LlamaConfig:
    """A transformers LlamaConfig of this shape; special_ids are (bos, eos, pad)."""
    from transformers import LlamaConfig

    bos, eos, pad = special_ids
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=shape.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta},
        rms_norm_eps=shape.rms_norm_eps,
        tie_word_embeddings=tie_word_embeddings,
        hidden_act="silu",
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        dtype=dtype,
    )


def _build_base(folder: Path, spec: DemoSpec) -> None:
    import torch
    from transformers import LlamaForCausalLM

    vocab = _vocab_and_merges()[0]
    config = llama_config(
        spec,
        vocab_size=len(vocab),
        special_ids=(vocab[BOS], vocab[EOS], vocab[PAD]),
        tie_word_embeddings=spec.tie_word_embeddings,
        dtype="float32",
    )
    # transformers initialises from the global RNG; fork it so the caller's random stream is untouched.
    with torch.random.fork_rng(devices=[]):
        model = LlamaForCausalLM(config)
    _randomize_base(model, spec.seed)
    with _quiet_progress():
        model.save_pretrained(folder)


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """Hide transformers' progress bars (the demo build prints nothing), then restore the setting."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _randomize_base(model: PreTrainedModel, seed: int) -> None:
    """Seeded normal weights drawn in parameter order from a private generator; norms at one.

    Unit-gain scales (std 1/sqrt(fan_in), embeddings at std 1) rather than the usual 0.02: each projection
    keeps its input's size, so attention is sharp enough for the context to matter and the current token
    stays visible in the residual stream. At 0.02 a random model of the default size greedily repeats one
    token. lm_head's gain of 2 gives logits of std ~2: a distribution with a clear top, so that sampling
    parameters make a difference.
    """
    import torch

    tied = bool(model.config.tie_word_embeddings)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
                continue
            if name.endswith("embed_tokens.weight") and not tied:
                std = _EMBED_STD
            else:  # a projection [out, in]; a tied embedding is scaled as the lm_head it also is
                gain = _LM_HEAD_GAIN if tied or name.startswith("lm_head") else 1.0
                std = gain / math.sqrt(param.shape[1])
            param.copy_(torch.randn(param.shape, generator=generator) * std)


def make_adapter(
    base_path: Path,
    out_dir: Path,
    r: int,
    lora_alpha: int = DEMO_LORA_ALPHA,
    target_modules: Sequence[str] = LORA_TARGET_MODULES,
    seed: int = 0,
    use_rslora: bool = False,
    safe_serialization: bool = True,
    *,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write a PEFT LoRA adapter for the checkpoint at `base_path` into `out_dir` and return `out_dir`.

    A and B are both seeded random (PEFT would start B at zero, a no-op adapter), scaled so that each
    delta is a fixed fraction of its projection's output. `safe_serialization=False` writes the
    `adapter_model.bin` pickle that older adapters use.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=0.1,
        target_modules=list(target_modules),
        task_type="CAUSAL_LM",
        use_rslora=use_rslora,
        init_lora_weights=False,
    )
    with _quiet_progress():
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft reads an attribute that transformers 5 deprecates: their warning, nothing the caller can fix.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        peft_model = get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = base_model_name_or_path or str(base_path)
    _randomize_lora(peft_model, seed)
    # No embedding layer is ever targeted; "auto" would look the base up by name (on the Hub, if the
    # path does not exist yet, as while the demo is staged).
    peft_model.save_pretrained(
        str(out_dir), safe_serialization=safe_serialization, save_embedding_layers=False
    )
    return out_dir


def _randomize_lora(model: PeftModel, seed: int) -> None:
    """Seeded A and B for every LoRA layer. A ~ N(0, 1/in) keeps |A x| near |x|; B is sized so that
    scaling * B A x is about _LORA_STRENGTH times the base projection's W x."""
    import torch
    from peft.tuners.lora import LoraLayer
    from torch import nn

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if not isinstance(layer, LoraLayer):
                continue
            lora_a, lora_b, base = layer.lora_A["default"], layer.lora_B["default"], layer.get_base_layer()
            assert isinstance(lora_a, nn.Linear) and isinstance(lora_b, nn.Linear)
            assert isinstance(base, nn.Linear)
            rank, fan_in = lora_a.weight.shape
            base_gain = base.weight.std().item() * math.sqrt(fan_in)
            std_b = _LORA_STRENGTH * base_gain / (layer.scaling["default"] * math.sqrt(rank))
            lora_a.weight.copy_(torch.randn(lora_a.weight.shape, generator=generator) / math.sqrt(fan_in))
            lora_b.weight.copy_(torch.randn(lora_b.weight.shape, generator=generator) * std_b)


def build_tokenizer(folder: Path, model_max_length: int = 2048) -> None:
    """Write a LLaMA-style tokenizer: tokenizer.json, tokenizer_config.json, special_tokens_map.json.

    BPE with byte fallback: `<unk>`=0, `<s>`=1, `</s>`=2, `<0x00>`..`<0xFF>`=3..258, `<pad>` last. ASCII,
    some English subwords and a few thousand hanzi are pieces; any other character is spelled in UTF-8
    byte tokens. `AutoTokenizer` adds one BOS by default, and `<s>` written in text is the BOS token.
    """
    folder.mkdir(parents=True, exist_ok=True)
    _tokenizer_object().save(str(folder / "tokenizer.json"))
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD}
    config = {
        # Not LlamaTokenizer(Fast): transformers 5 rebuilds that class's pipeline from the vocab and would
        # drop the normalizer below; the generic class loads tokenizer.json exactly as written.
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    _write_json(folder / "tokenizer_config.json", config)
    _write_json(folder / "special_tokens_map.json", specials)


def _write_json(path: Path, value: Mapping[str, object]) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _tokenizer_object() -> Tokenizer:
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    vocab, merges = _vocab_and_merges()
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=UNK, fuse_unk=True, byte_fallback=True))
    # Spaces become ▁ and each run of text between special tokens gets one leading ▁, as SentencePiece's
    # dummy prefix does (the "legacy" LLaMA tokenizer that ChatMed was trained with). Prepend, unlike
    # Metaspace, adds it even before a leading space, so the decoder's Strip gives the text back exactly.
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    # Special tokens are matched in text before the model sees it: "<s>" typed in a template is one BOS.
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in (UNK, BOS, EOS, PAD)]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return tokenizer


def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The piece -> id table and the BPE merges, in a fixed order (ids never depend on hashing)."""
    pieces = dict.fromkeys([UNK, BOS, EOS, *(f"<0x{b:02X}>" for b in range(256)), SPACE])
    pieces.update(dict.fromkeys(chr(c) for c in range(0x21, 0x7F)))  # printable ASCII but the space
    pieces.update(dict.fromkeys(_CJK_PUNCTUATION))
    pieces.update(dict.fromkeys(_hanzi()))
    merges: list[tuple[str, str]] = []
    # Each word becomes a chain of merges (w[:1]+w[1], w[:2]+w[2], ...), all prefixes becoming pieces.
    for word in (*(SPACE + c for c in _ASCII_LETTERS), *_ENGLISH_WORDS.split(), *_CHINESE_WORDS.split()):
        for end in range(2, len(word) + 1):
            if word[:end] not in pieces:
                pieces[word[:end]] = None
                merges.append((word[: end - 1], word[end - 1]))
    pieces[PAD] = None  # last, like the pad that Chinese-LLaMA-Alpaca appends to its vocab
    merges.sort(key=lambda pair: len(pair[0]))  # shorter merges first, as BPE training would rank them
    return {piece: index for index, piece in enumerate(pieces)}, merges


def _hanzi() -> list[str]:
    chars = dict.fromkeys(_COMMON_HANZI + _MEDICAL_HANZI + "".join(_CHINESE_WORDS.split()))
    for code in range(_CJK_FIRST, _CJK_LAST + 1, _HANZI_FILL_STRIDE):
        if len(chars) >= _NUM_HANZI:
            break
        chars.setdefault(chr(code))
    return list(chars)


_ASCII_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_CJK_PUNCTUATION = "，。、；：？！“”‘’（）《》【】…—·「」『』～％＋－×÷＝／０１２３４５６７８９℃"
# ▁ marks a word start. Suffixes and word-internal pieces stand without it.
_ENGLISH_WORDS = """
▁the ▁of ▁and ▁to ▁in ▁is ▁it ▁that ▁for ▁you ▁was ▁with ▁on ▁as ▁are ▁be ▁at ▁this ▁have ▁from
▁or ▁by ▁not ▁but ▁what ▁all ▁were ▁we ▁when ▁your ▁can ▁said ▁there ▁use ▁an ▁each ▁which ▁she
▁do ▁how ▁their ▁if ▁will ▁up ▁other ▁about ▁out ▁many ▁then ▁them ▁these ▁so ▁some ▁her ▁would
▁make ▁like ▁him ▁into ▁time ▁has ▁look ▁two ▁more ▁go ▁see ▁no ▁way ▁could ▁people ▁my ▁than
▁first ▁water ▁been ▁who ▁its ▁now ▁find ▁long ▁down ▁day ▁did ▁get ▁come ▁made ▁may ▁part ▁after
▁before ▁should ▁need ▁help ▁take ▁eat ▁drink ▁sleep ▁please ▁thank ▁hello ▁question ▁answer
▁patient ▁doctor ▁pain ▁medicine ▁health ▁blood ▁heart ▁head ▁fever ▁cough ▁hospital ▁treatment
▁symptoms ▁disease ▁drug ▁dose ▁mg ▁body ▁child ▁stomach ▁skin ▁liver ▁lung ▁kidney ▁pressure
▁sugar ▁test ▁week ▁year ▁daily ▁twice ▁tablet ▁infection ▁allergy ▁chronic ▁acute ▁herbal
ing ed er es ly tion ment ness able al ar or en an on in at it is ic ous ive ity est ers ions ation re
th he ou ch sh st nd ll ee oo ea ai ie ow ay ent ence ance ful less ist ism ize ise ical ally ure
"""
_CHINESE_WORDS = """
医生 病人 患者 症状 治疗 药物 检查 医院 疾病 感冒 发烧 咳嗽 头痛 肚子 怎么 什么 可以 没有 我们 你们
他们 这个 那个 如果 因为 所以 但是 时候 需要 建议 注意 饮食 休息 中医 中药 西药 气血 阴阳 脾胃 肝肾
湿热 舌苔 脉象 问题 回答 孩子 宝宝 小孩 怀孕 月经 血压 血糖 糖尿病 高血压 心脏 胃炎 皮肤 过敏 湿疹
失眠 便秘 腹泻 呕吐 恶心 疼痛 一般 一下 不要 不是 已经 现在 比较 情况 身体 应该 还是 一个 服用 每天
两次 医嘱 复查 手术 炎症 感染 抗生素 维生素 黄芪 当归 人参 甘草 茯苓 白术 柴胡 枸杞 艾灸 针灸 推拿
汤药 方剂 辨证 调理 您好 谢谢 请问 问： 答：
"""
# About 2,000 of the most frequent hanzi, most frequent first.
_COMMON_HANZI = (
    "的一是不了在人有我他这个们中来上大为和国地到以说时要就出会可也你对生能而子那得于着下自之年过发后"
    "作里用道行所然家种事成方多经么去法学如都同现当没动面起看定天分还进好小部其些主样理心她本前开但因"
    "只从想实日军者意无力它与长把机十民第公此已工使情明性知全三又关点正业外将两高间由问很最重并物手应"
    "战向头文体政美相见被利什二等产或新己制身果加西斯月话合回特代内信表化老给世位次度门任常先海通教儿"
    "原东声提立及比员解水名真论处走义各入几口认条平系气题活尔更别打女变四神总何电数安少报才结反受目太"
    "量再感建务做接必场件计管期市直德资命山金指克许统区保至队形社便空决治展马科司五基眼书非则听白却界"
    "达光放强即像难且权思王象完设式色路记南品住告类求据程北边死张该交规万取拉格望觉术领共确传师观清今"
    "切院让识候带导争运笑飞风步改收根干造言联持组每济车亲极林服快办议往元英士证近失转夫令准布始怎呢存"
    "未远叫台单影具罗字爱击流备兵连调深商算质团集百需价花党华城石级整府离况亚请技际约示复病息究线似官"
    "火断精满支视消越器容照须九增研写称企八功吗包片史委乎查轻易早曾除农找装广显吧阿李标谈吃图念六引历"
    "首医局突专费号尽另周较注语仅考落青随选列武红响虽推势参希古众构房半节土投某案黑维革划敌致陈律足态"
    "护七兴派孩验责营星够章音跟志底站严巴例防族供效续施留讲型料终答紧黄绝奇察母京段依批群项故按河米围"
    "江织害斗双境客纪采举杀攻父苏密低朝友诉止细愿千值仍男钱破网热助倒育属坐帝限船脸职速刻乐否刚威毛状"
    "率甚独球般普怕弹校苦创假久错承印晚兰试股拿脑预谁益阳若哪微尼继送急血惊伤素药适波夜省初喜卫源食险"
    "待述陆习置居劳财环排福纳欢雷警获模充负云停木游龙树疑层冷洲冲射略范竟句室异激汉村哈策演简卡罪判担"
    "州静退既衣您宗积余痛检差富灵协角占配征修皮挥胜降阶审沉坚善妈刘读啊超免压银买皇养伊怀执副乱抗犯追"
    "帮宣佛岁航优怪香著田铁控税左右份穿艺背阵草脚概恶块顿敢守酒岛托央户烈洋哥索胡款靠评版宝座释景顾弟"
    "登货互付伯慢欧换闻危忙核暗姐介坏讨丽良序升监临亮露永呼味野架域沙掉括舰鱼杂误湾吉减编楚肯测败屋跑"
    "梦散温困剑渐封救贵枪缺楼县尚毫移娘朋画班智亦耳恩短掌恐遗固席松秘谢鲁遇康虑幸均销钟诗藏赶剧票损忽"
    "巨炮旧端探湖录叶春乡附吸予礼港雨呀板庭妇归睛饭额含顺输摇招婚脱补谓督毒油疗旅泽材灭逐莫笔亡鲜词圣"
    "择寻厂睡博勒烟授诺伦岸奥唐卖俄炸载洛健堂旁宫喝借君禁阴园谋宋避抓荣姑孙逃牙束跳顶玉镇雪午练迫爷篇"
    "肉嘴馆遍凡础洞卷坦牛宁纸诸训私庄祖丝翻暴森塔默握戏隐熟骨访弱蒙歌店鬼软典欲萨伙遭盘爸扩盖弄雄稳忘"
    "亿刺拥徒姆杨齐赛趣曲刀床迎冰虚玩析窗醒妻透购替塞努休虎扬途侵刑绿兄迅套贸毕唯谷轮库迹尤竞街促延震"
    "弃甲伟麻川申缓潜闪售灯针哲络抵朱埃抱鼓植纯夏忍页杰筑折郑贝尊吴秀混臣雅振染盛怒舞圆搞狂措姓残秋培"
    "迷诚宽宇猛摆梅毁伸摩盟末乃悲拍丁赵硬麦蒋操耶阻订彩抽赞魔纷沿喊违妹浪汇币丰蓝殊献桌啦瓦莱援译夺汽"
    "烧距裁偏符勇触课敬哭懂墙袭召罚侠厅拜巧侧韩冒债曼融惯享戴童犹乘挂奖绍厚纵障讯涉彻刊丈爆乌役描洗玛"
    "患妙镜唱烦签仙彼弗症仿倾牌陷鸟轰咱菜闭奋庆撤泪茶疾缘播朗杜奶季丹狗尾仪偷奔珠虫驻孔宜艾桥淡翼恨繁"
    "寒伴叹旦愈潮粮缩罢聚径恰挑袋灰捕徐珍幕映裂泰隔启尖忠累炎暂估泛荒偿横拒瑞忆孤鼻闹羊呆厉衡胞零穷舍"
    "码赫婆魂灾洪腿胆津俗辩胸晓劲贫仁偶辑邦恢赖圈摸仰润堆碰艇稍迟辆废净凶署壁御奉旋冬矿抬蛋晨伏吹鸡倍"
    "糊秦盾杯租骑乏隆诊奴摄丧污渡旗甘耐凭扎抢绪粗肩梁幻菲皆碎宙叔岩荡综爬荷悉蒂返井壮薄悄扫敏碍殖详迪"
    "矛霍允幅撒剩凯颗骂赏液番箱贴漫酸郎腰舒眉忧浮辛恋餐吓挺励辞艘键伍峰尺昨黎辈贯侦滑券崇扰宪绕趋慈乔"
    "阅汗枝拖墨胁插箭腊粉泥氏彭拔骗凤慧媒佩愤扑龄驱惜豪掩兼跃尸肃帕驶堡届欣惠册储飘桑闲惨洁踪勃宾频仇"
    "磨递邪撞拟滚奏巡颜剂绩贡疯坡瞧截燃焦殿伪柳锁逼颇昏劝呈搜勤戒驾漂饮曹朵仔柔俩孟腐幼践籍牧凉牲佳娜"
    "浓芳稿竹腹跌逻垂遵脉貌柏狱猜怜惑陶兽帐饰贷昌叙躺钢沟寄扶铺邓寿惧询汤盗肥尝匆辉奈扣廷澳嘛董迁凝慰"
    "厌脏腾幽怨鞋丢埋泉涌辖躲晋紫艰魏吾慌祝邮吐狠鉴曰械咬邻赤挤弯椅陪割揭韦悟聪雾锋梯猫祥阔誉筹丛牵鸣"
    "沈阁穆屈旨袖猎臂蛇贺柱抛鼠瑟戈牢逊迈欺吨琴衰瓶恼燕仲诱狼池疼卢仗冠粒遥吕玄尘冯抚浅敦纠钻晶岂峡苍"
    "喷耗凌敲菌赔涂粹扁亏寂煤熊恭湿循暖糖赋抑秩帽哀宿踏烂袁侯抖夹昆肝擦猪炼恒慎搬纽纹玻渔磁铜齿跨押怖"
    "漠疲叛遣兹祭醉拳弥斜档稀捷肤疫肿豆削岗晃吞宏癌肚隶履涨耀扭坛拨沃绘伐堪仆郭牺歼墓雇廉契拼惩捉覆刷"
    "劫嫌瓜歇雕闷乳串娃缴唤赢莲霸桃妥瘦搭赴岳嘉舱俊址庞耕锐缝悔邀玲惟斥宅添挖呵讼氧浩羽斤酷掠妖祸侍乙"
    "妨贪挣汪尿莉悬唇翰仓轨枚盐览傅帅庙芬屏寺胖璃愚滴疏萧姿颤丑劣柯寸扔盯辱匹俱辨饿蜂哦腔郁溃谨糟葛苗"
    "肠忌溜鸿爵鹏鹰笼丘桂滋聊挡纲肌茨壳痕碗穴膀卓贤卧膜毅锦欠哩函茫昂薛皱夸豫胃舌剥傲拾窝睁携陵哼棉晴"
    "铃填饲渴吻扮逆脆喘罩卜炉柴愉绳胎蓄眠竭喂傻慕浑奸扇柜悦拦诞饱乾泡"
)
# Medical and TCM characters (organs, symptoms, herbs) not all frequent in general text.
_MEDICAL_HANZI = (
    "医药病症疗治诊断痛炎热寒虚实湿燥风火暑肺胃肝肾脾心胆肠膀胱血脉舌苔咳嗽痰喘哮疹痒肿瘤癌疮痘疱疖痔"
    "瘀癫痫痢疸痨呕吐泻秘眩晕悸汗尿便经孕娩乳腺甲状骨髓脊椎腰膝颈肩关节韧腱肌肤毛发眼耳鼻喉齿龈咽扁桃"
    "腹胸背臀腿足掌指趾疼酸胀麻木乏倦虚弱营养维素钙铁锌碘钾钠激胰岛糖脂蛋白抗菌毒疫苗针剂片胶囊颗粒丸"
    "散膏汤煎服剂量副作禁忌孕妇婴幼儿童老年芪归参苓术杞芍芎地连翘柴桂枝杏仁薏苡茯甘草姜枣附夏陈砂藿佩"
    "兰菊薄荷荆芥防羌独杜仲续牛丹贝母枇杷蒲公英银板蓝根芩柏栀知石膏玄麦冬味山药茱萸泽泻牡阿鹿茸龟鳖灸"
    "拔罐推拿按摩穴位经络阴阳气津液辨证调理补泻温清"
)
