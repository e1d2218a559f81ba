"""The KerasHub zoo: every task class of `keras_hub.models`, built offline
from a small config where this file knows how, and checked against the
task's own `fit`.

`BUILDERS` maps a task class name to a builder, `() -> (task, x, y)` with
raw inputs (strings, uint8 or float images); `UNTRAINABLE` holds the ones
built whose own `fit` cannot train them, `NOT_BUILT` why others are not
built, and a class with a `fit` of its own is refused by SAMModel
(`status`). `conformance(name)` trains a task with `task.fit` and a twin
through `SAMModel(twin, rho=0)` on the same data and reports how far apart
they end, then one step at rho = 0.05. `tests/test_kerashub_zoo.py` asserts
it; `benchmarks/kerashub_zoo.py` prints the table.
"""

from __future__ import annotations

import functools
import inspect
import io

import keras
import numpy as np

import hub_models

WORDS = hub_models.WORDS
_WORDPIECE = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
_BPE = {"<|endoftext|>": 0, "a": 1, "b": 2, "c": 3, "Ġ": 4, "Ġa": 5, "Ġb": 6,
        "Ġc": 7}
_MERGES = ["Ġ a", "Ġ b", "Ġ c"]
_SMALL = dict(num_layers=1, num_heads=2, hidden_dim=8, intermediate_dim=16)
# Gaps are relative to a tensor's largest entry, or to this where that is
# smaller (a bias whose gradient is 0 stays at about 1e-12 in both runs).
SCALE = 1e-3


def _bpe(specials: dict) -> dict:
    """The a/b/c byte-pair vocabulary after `specials` (token: id)."""
    offset = max(specials.values())
    return {**specials, **{k: v + offset for k, v in _BPE.items() if v}}


def _hub():
    import keras_hub

    return keras_hub.models


# ------------------------------------------------------------ builders

def _text_classifier(prefix, tokenizer_args, backbone_args=_SMALL):
    return _sequence_classifier(
        prefix, tokenizer_args,
        dict(max_sequence_length=8, dropout=0.0, **backbone_args),
        lambda seed: hub_models.reviews(16, seed=1),
        task_args=dict(dropout=0.0))


def _tokenized_task(prefix, tokenizer_args, backbone_args, task, seed,
                    backbone=None, sequence_length=8, **task_args):
    """keras_hub.models.{prefix}{task} over its backbone, with its
    preprocessor and a tokenizer from an in-memory vocabulary."""
    m = _hub()
    keras.utils.set_random_seed(seed)
    tokenizer = getattr(m, f"{prefix}Tokenizer")(**tokenizer_args())
    model = getattr(m, f"{backbone or prefix}Backbone")(
        vocabulary_size=tokenizer.vocabulary_size(), **backbone_args)
    preprocessor = getattr(m, f"{prefix}{task}Preprocessor")(
        tokenizer, sequence_length=sequence_length)
    return getattr(m, f"{prefix}{task}")(backbone=model,
                                         preprocessor=preprocessor,
                                         **task_args)


def _causal_lm(prefix, tokenizer_args, backbone_args, data=None):
    """A causal LM on 8 sentences, or on `data()` (Gemma3's prompts and
    responses)."""
    def build(seed=0):
        task = _tokenized_task(prefix, tokenizer_args, backbone_args,
                               "CausalLM", seed)
        return task, (data or (lambda: hub_models.sentences(8, seed=1)))(), \
            None
    return build


def _prompts_and_responses(n=8):
    words = hub_models.sentences(2 * n, seed=1)
    return {"prompts": words[:n], "responses": words[n:]}


def _masked_lm(prefix, tokenizer_args, texts=None, backbone_args=None,
               backbone=None, task="MaskedLM"):
    """A masked LM, fed the batches its preprocessor made once: the masks
    are drawn at random each time the preprocessor runs, so raw strings
    would train the two runs on different masks. `backbone` and `task`:
    the names after the prefix where they differ (ESM-2: "ESM2",
    "MaskedPLM")."""
    def build(seed=0):
        m = _hub()
        keras.utils.set_random_seed(seed)
        tokenizer = getattr(m, f"{prefix}Tokenizer")(**tokenizer_args())
        model = getattr(m, f"{backbone or prefix}Backbone")(
            vocabulary_size=tokenizer.vocabulary_size(),
            **(backbone_args or dict(max_sequence_length=8, dropout=0.0,
                                     **_SMALL)))
        preprocessor = getattr(m, f"{prefix}{task}Preprocessor")(
            tokenizer, sequence_length=8, mask_selection_rate=0.5,
            mask_selection_length=4)
        lm = getattr(m, f"{backbone or prefix}{task}")(
            model, preprocessor=preprocessor)
        keras.utils.set_random_seed(seed)
        raw = (texts or (lambda: hub_models.reviews(16, seed=1)[0]))()
        x, y, sample_weight = preprocessor(list(raw))
        lm.preprocessor = None
        x = keras.tree.map_structure(np.asarray, x)
        return lm, x, (np.asarray(y), np.asarray(sample_weight))
    return build


def _image_classifier(prefix, backbone_args, task_args=None):
    def build(seed=0):
        import keras_hub

        m = _hub()
        keras.utils.set_random_seed(seed)
        converter = getattr(keras_hub.layers, f"{prefix}ImageConverter")(
            image_size=(16, 16), scale=1 / 255.0)
        backbone = getattr(m, f"{prefix}Backbone")(**backbone_args)
        task = getattr(m, f"{prefix}ImageClassifier")(
            backbone, num_classes=2, **(task_args or {}),
            preprocessor=getattr(m, f"{prefix}ImageClassifierPreprocessor")(
                converter))
        return (task, *hub_models.raw_images(8, seed=1))
    return build


def _wordpiece():
    return dict(vocabulary=_WORDPIECE)


def _roberta():
    return dict(vocabulary=_bpe({"<s>": 0, "<pad>": 1, "</s>": 2,
                                 "<unk>": 3, "<mask>": 4}), merges=_MERGES)


def _gpt2_style():
    return dict(vocabulary=dict(_BPE), merges=_MERGES)


def _opt():
    return dict(vocabulary=_bpe({"<s>": 0, "<pad>": 1, "</s>": 2}),
                merges=_MERGES)


def _bloom():
    return dict(vocabulary=_bpe({"<unk>": 0, "<s>": 1, "</s>": 2,
                                 "<pad>": 3}), merges=_MERGES)


def _qwen():
    return dict(vocabulary=_bpe({"<|endoftext|>": 0, "<|im_end|>": 1}),
                merges=_MERGES)


def _llama3():
    return dict(vocabulary=_bpe({"<|begin_of_text|>": 0,
                                 "<|end_of_text|>": 1,
                                 "<|start_header_id|>": 2,
                                 "<|end_header_id|>": 3, "<|eot_id|>": 4}),
                merges=_MERGES)


_GQA = dict(num_layers=1, num_query_heads=2, num_key_value_heads=1,
            hidden_dim=8, intermediate_dim=16)


@functools.cache
def _spm_proto(pad, unk, bos, eos, extra=()) -> bytes:
    """A SentencePiece word model of WORDS and a, b, c, trained in memory,
    with the special pieces a family's tokenizer looks for. (With ten or
    more pieces the word trainer counts their characters against the size:
    there the size is a bound, not exact.)"""
    import sentencepiece

    words = WORDS + ["a", "b", "c"]
    exact = len(extra) < 10
    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([" ".join(words)] * 4), model_writer=out,
        model_type="word", hard_vocab_limit=exact,
        vocab_size=len(words) + 4 + (1 if exact else 2) * len(extra),
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, pad_piece=pad,
        unk_piece=unk, bos_piece=bos, eos_piece=eos,
        user_defined_symbols=list(extra), minloglevel=2)
    return out.getvalue()


def _spm(pad="<pad>", unk="<unk>", bos="<s>", eos="</s>", extra=(),
         **tokenizer_args):
    """tokenizer_args() for a SentencePiece tokenizer (see _spm_proto)."""
    return lambda: dict(proto=_spm_proto(pad, unk, bos, eos, tuple(extra)),
                        **tokenizer_args)


def _t5(seed=0):
    """T5Seq2SeqLM over a, b, c, as BartSeq2SeqLM (hub_models.pairs)."""
    m = _hub()
    keras.utils.set_random_seed(seed)
    tokenizer = m.T5Tokenizer(**_spm()())
    backbone = m.T5Backbone(vocabulary_size=tokenizer.vocabulary_size(),
                            dropout=0.0, **_SMALL)
    task = m.T5Seq2SeqLM(backbone, preprocessor=m.T5Seq2SeqLMPreprocessor(
        tokenizer, encoder_sequence_length=8, decoder_sequence_length=8))
    return task, hub_models.pairs(8, seed=1), None


def _embedder(prefix, tokenizer_args, backbone_args):
    """A TextEmbedder (pooled, L2-normalized) fit to unit vectors: it has
    no default loss (COMPILE gives it one)."""
    def build(seed=0):
        task = _tokenized_task(prefix, tokenizer_args, backbone_args,
                               "TextEmbedder", seed)
        targets = np.random.default_rng(1).normal(size=(16, 8))
        targets /= np.linalg.norm(targets, axis=1, keepdims=True)
        return task, hub_models.reviews(16, seed=1)[0], targets.astype(
            "float32")
    return build


def _pali_gemma(seed=0):
    """PaliGemmaCausalLM: a ViT of 16 x 16 images with patches of 4 in
    front of a Gemma decoder; raw images, prompts and responses."""
    import keras_hub

    m = _hub()
    keras.utils.set_random_seed(seed)
    tokenizer = m.PaliGemmaTokenizer(**_spm(bos="<bos>", eos="<eos>")())
    backbone = m.PaliGemmaBackbone(
        vocabulary_size=tokenizer.vocabulary_size(), image_size=16,
        vit_patch_size=4, vit_num_heads=2, vit_hidden_dim=8,
        vit_num_layers=1, vit_intermediate_dim=16, **_GEMMA)
    converter = keras_hub.layers.PaliGemmaImageConverter(
        image_size=(16, 16), scale=1 / 255.0)
    task = m.PaliGemmaCausalLM(
        backbone=backbone, preprocessor=m.PaliGemmaCausalLMPreprocessor(
            tokenizer, converter, sequence_length=8))
    images, _ = hub_models.raw_images(8, seed=1)
    return task, {"images": images, **_prompts_and_responses()}, None


def _parseq(seed=0):
    """PARSeqCausalLM (its own compute_loss: the decoder under 6 random
    permutations of the label order) reading words off 16 x 32 images."""
    import keras_hub

    m = _hub()
    keras.utils.set_random_seed(seed)
    length = 6
    preprocessor = m.PARSeqCausalLMPreprocessor(
        image_converter=keras_hub.layers.PARSeqImageConverter(
            image_size=(16, 32), scale=1 / 255.0),
        tokenizer=m.PARSeqTokenizer(max_label_length=length),
        sequence_length=length)
    encoder = m.ViTBackbone(image_shape=(16, 32, 3), patch_size=(4, 8),
                            num_layers=1, num_heads=2, hidden_dim=8,
                            mlp_dim=16, use_class_token=False)
    backbone = m.PARSeqBackbone(
        image_encoder=encoder,
        vocabulary_size=preprocessor.tokenizer.vocabulary_size(),
        max_label_length=length, decoder_hidden_dim=8, num_decoder_layers=1,
        num_decoder_heads=2, decoder_mlp_dim=16, dropout_rate=0.0,
        attention_dropout=0.0)
    task = m.PARSeqCausalLM(preprocessor=preprocessor, backbone=backbone,
                            seed=seed)
    images, _ = hub_models.raw_images(8, seed=1)
    words = np.random.default_rng(1).choice(WORDS, 8)
    return task, {"images": images, "responses": words}, None


# Compile arguments where a task has no default (both runs get them).
COMPILE = {name: dict(loss="mse") for name in (
    "XLMRobertaTextEmbedder", "BertTextEmbedder", "Qwen3TextEmbedder",
    "Gemma3TextEmbedder")}

def _qwen3_5():
    return dict(vocabulary=_bpe({"<|endoftext|>": 0, "<|im_end|>": 1,
                                 "<|im_start|>": 2}),
                merges=_MERGES, has_vision_tokens=False)


# head_dim 8: a quarter of it is rotated, and the rotation needs pairs.
_QWEN3_5 = dict(num_layers=2, num_query_heads=2, num_key_value_heads=1,
                head_dim=8, hidden_dim=8,
                layer_types=["linear_attention", "full_attention"],
                linear_num_key_heads=1, linear_num_value_heads=2,
                linear_key_head_dim=4, linear_value_head_dim=4)
_BERT_SPM = _spm(bos="[CLS]", eos="[SEP]", extra=("[MASK]",))
_GEMMA = dict(num_layers=1, num_query_heads=2, num_key_value_heads=1,
              hidden_dim=8, intermediate_dim=16, head_dim=4)


def _sequence_classifier(prefix, tokenizer_args, backbone_args, data,
                         backbone=None, task="TextClassifier",
                         sequence_length=8, task_args=None):
    """A classifier of token sequences with its preprocessor, 2 classes;
    `data(seed)` gives its raw inputs and labels."""
    def build(seed=0):
        return (_tokenized_task(prefix, tokenizer_args, backbone_args, task,
                                seed, backbone=backbone,
                                sequence_length=sequence_length,
                                num_classes=2, **(task_args or {})),
                *data(seed))
    return build


_AMINO_ACIDS = list("ACDEFGHIKLMNPQRSTVWY")
_ROFORMER = dict(num_layers=1, num_heads=2, hidden_dim=8, intermediate_dim=16,
                 head_size=4, dropout=0.0)
_ESM = dict(num_layers=1, num_heads=2, hidden_dim=8, intermediate_dim=16,
            dropout=0.0, max_sequence_length=16)


def _esm_vocabulary():
    return dict(vocabulary=["<pad>", "<unk>", "<cls>", "<eos>", "<mask>"]
                + _AMINO_ACIDS)


def _proteins(n=16, seed=1):
    rng = np.random.default_rng(seed)
    return np.array([" ".join(rng.choice(_AMINO_ACIDS, 6)) for _ in range(n)])


def _labelled_proteins(seed):
    """16 random protein sequences (space-separated residues), labels."""
    rng = np.random.default_rng(seed + 1)
    proteins = np.array([" ".join(rng.choice(_AMINO_ACIDS, 8))
                         for _ in range(16)])
    return proteins, rng.integers(0, 2, 16)


def _basnet(seed=0):
    return (hub_models.basnet(seed), *hub_models.masks(8, seed=1))


def _small_resnet():
    return _hub().ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 8, 8, 8],
        stackwise_num_blocks=[1, 1, 1, 1],
        stackwise_num_strides=[1, 2, 2, 2], block_type="basic_block",
        use_pre_activation=False)


def _deeplab(seed=0):
    """DeepLabV3ImageSegmenter, 2 classes, on 32 x 32 images."""
    m = _hub()
    keras.utils.set_random_seed(seed)
    backbone = m.DeepLabV3Backbone(
        image_encoder=_small_resnet(), spatial_pyramid_pooling_key="P4",
        upsampling_size=4, dilation_rates=[1, 2], low_level_feature_key="P2",
        projection_filters=8, image_shape=(32, 32, 3))
    images, masks = hub_models.masks(8, seed=seed + 1)
    one_hot = np.concatenate([1.0 - masks, masks], axis=-1)
    return (m.DeepLabV3ImageSegmenter(backbone, num_classes=2), images,
            one_hot.astype("float32"))


def _segformer(seed=0):
    """SegFormerImageSegmenter, 2 classes, on 32 x 32 images, over a MiT of
    two stages (KerasHub names the MiT's layers by width: equal widths
    collide, "linear_8 is used 2 times")."""
    import keras_hub

    m = _hub()
    keras.utils.set_random_seed(seed)
    encoder = m.MiTBackbone(
        layerwise_depths=[1, 1], num_layers=2, layerwise_num_heads=[1, 2],
        layerwise_sr_ratios=[2, 1], max_drop_path_rate=0.0,
        layerwise_patch_sizes=[3, 3], layerwise_strides=[2, 2],
        image_shape=(32, 32, 3), hidden_dims=[4, 8])
    converter = keras_hub.layers.SegFormerImageConverter(image_size=(32, 32))
    task = m.SegFormerImageSegmenter(
        m.SegFormerBackbone(image_encoder=encoder, projection_filters=8),
        num_classes=2,
        preprocessor=m.SegFormerImageSegmenterPreprocessor(converter))
    images, masks = hub_models.masks(8, seed=seed + 1)
    return task, images, np.concatenate([1.0 - masks, masks], axis=-1)


def _retinanet(seed=0):
    """RetinaNetObjectDetector (its own `compute_loss`: anchors matched to
    the boxes, focal and box losses) on 64 x 64 images, two boxes each."""
    m = _hub()
    keras.utils.set_random_seed(seed)
    backbone = m.RetinaNetBackbone(image_encoder=_small_resnet(), min_level=3,
                                   max_level=4, use_p5=False,
                                   image_shape=(64, 64, 3))
    task = m.RetinaNetObjectDetector(backbone, num_classes=2,
                                     bounding_box_format="yxyx",
                                     pre_logits_num_conv_layers=1)
    rng = np.random.default_rng(seed + 1)
    images = rng.uniform(size=(8, 64, 64, 3)).astype("float32")
    boxes = np.tile(np.array([[[8, 8, 40, 40], [16, 24, 48, 56]]],
                             "float32"), (8, 1, 1))
    labels = rng.integers(0, 2, size=(8, 2)).astype("float32")
    return task, images, {"boxes": boxes, "labels": labels}


def _dfine(seed=0):
    """DFineObjectDetector (its own `compute_loss`: Hungarian matching, then
    VFL, box, CIoU, fine-grained localization and distillation losses) over
    an HGNetV2 of 32 x 32 images, two boxes each."""
    import keras_hub

    m = _hub()
    keras.utils.set_random_seed(seed)
    features = dict(out_features=["stage1", "stage2"],
                    image_shape=(None, None, 3))
    encoder = m.HGNetV2Backbone(
        stem_channels=[3, 4, 4], embedding_size=4, depths=[1, 1],
        stackwise_stage_filters=[[4, 4, 8, 1, 1, 3], [8, 4, 8, 1, 1, 3]],
        apply_downsample=[False, True], hidden_sizes=[8, 8],
        use_lightweight_conv_block=[False, False], hidden_act="relu",
        use_learnable_affine_block=True, **features)
    backbone = m.DFineBackbone(
        backbone=encoder, decoder_in_channels=[8, 8], encoder_hidden_dim=8,
        num_denoising=0, num_labels=2, hidden_dim=8,
        learn_initial_query=False, num_queries=4, anchor_image_size=(32, 32),
        feat_strides=[4, 8], num_feature_levels=2,
        encoder_in_channels=[8, 8], encode_proj_layers=[1],
        num_attention_heads=2, encoder_ffn_dim=16, num_encoder_layers=1,
        hidden_expansion=0.5, depth_multiplier=0.5, eval_idx=-1,
        num_decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=16,
        decoder_n_points=[2, 2], lqe_hidden_dim=8, num_lqe_layers=1,
        seed=seed, **features)
    converter = keras_hub.layers.DFineImageConverter(
        bounding_box_format="yxyx", image_size=(32, 32))
    task = m.DFineObjectDetector(
        backbone, num_classes=2, bounding_box_format="yxyx",
        preprocessor=m.DFineObjectDetectorPreprocessor(converter))
    rng = np.random.default_rng(seed + 1)
    images = rng.uniform(0, 255, size=(8, 32, 32, 3)).astype("float32")
    boxes = np.tile(np.array([[[4, 4, 20, 20], [8, 12, 24, 28]]],
                             "float32"), (8, 1, 1))
    labels = rng.integers(0, 2, size=(8, 2)).astype("int32")
    return task, images, {"boxes": boxes, "labels": labels}


def _seq2seq(seed=0):
    return hub_models.seq2seq_lm(seed), hub_models.pairs(8, seed=1), None


def _token_ids(seed, n=8, length=8, vocabulary=16):
    """(inputs, targets) of next-token prediction: random ids, shifted."""
    ids = np.random.default_rng(seed).integers(1, vocabulary,
                                               size=(n, length + 1))
    return ids[:, :-1].astype("int32"), ids[:, 1:].astype("int32")


def _rwkv7(seed=0):
    """RWKV7CausalLM fed token ids (KerasHub ships its preprocessor but
    no offline tokenizer vocabulary format of its own to build here)."""
    m = _hub()
    keras.utils.set_random_seed(seed)
    backbone = m.RWKV7Backbone(hidden_size=16, head_size=8, num_layers=1,
                               vocabulary_size=16, intermediate_dim=32,
                               gate_lora=4, mv_lora=4, aaa_lora=4,
                               decay_lora=4)
    ids, targets = _token_ids(1)
    x = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    return (m.RWKV7CausalLM(backbone, preprocessor=None), x,
            (targets, np.ones(targets.shape, "float32")))


def _edrec(seed=0):
    """EdRecSeq2SeqLM (no preprocessor class in KerasHub): token ids."""
    m = _hub()
    keras.utils.set_random_seed(seed)
    backbone = m.EdRecBackbone(vocab_size=16, num_layers_enc=1,
                               num_layers_dec=1, hidden_dim=8,
                               intermediate_dim=16, num_heads=2)
    ids, targets = _token_ids(1)
    encoder_ids, _ = _token_ids(2)
    mask = np.ones(ids.shape, bool)
    x = {"encoder_token_ids": encoder_ids, "decoder_token_ids": ids,
         "encoder_padding_mask": mask, "decoder_padding_mask": mask}
    return (m.EdRecSeq2SeqLM(backbone, preprocessor=None), x,
            (targets, np.ones(targets.shape, "float32")))


def _moonshine(seed=0):
    """MoonshineAudioToText fed model-ready inputs: 0.25 s of noise at
    16 kHz and token ids."""
    m = _hub()
    keras.utils.set_random_seed(seed)
    backbone = m.MoonshineBackbone(
        vocabulary_size=16, filter_dim=8, encoder_num_layers=1,
        decoder_num_layers=1, hidden_dim=8, intermediate_dim=16,
        encoder_num_heads=2, decoder_num_heads=2, max_position_embeddings=64,
        partial_rotary_factor=1.0)
    audio = 0.1 * np.random.default_rng(1).normal(size=(8, 4000, 1))
    ids, targets = _token_ids(1)
    x = {"encoder_input_values": audio.astype("float32"),
         "encoder_padding_mask": np.ones(audio.shape[:2], bool),
         "decoder_token_ids": ids,
         "decoder_padding_mask": np.ones(ids.shape, bool)}
    return (m.MoonshineAudioToText(backbone, preprocessor=None), x,
            (targets, np.ones(targets.shape, "float32")))


def _t5gemma(prefix):
    """{T5Gemma, T5Gemma2}Seq2SeqLM over a, b, c (a SentencePiece proto);
    T5Gemma2 text-only (no vision encoder)."""
    def build(seed=0):
        m = _hub()
        keras.utils.set_random_seed(seed)
        tokenizer = getattr(m, f"{prefix}Tokenizer")(
            **_spm(bos="<bos>", eos="<eos>")())
        side = dict(hidden_dim=8, intermediate_dim=16, num_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                    layer_types=["full_attention"])
        backbone = getattr(m, f"{prefix}Backbone")(
            vocabulary_size=tokenizer.vocabulary_size(),
            **{f"{part}_{k}": v for part in ("encoder", "decoder")
               for k, v in side.items()})
        task = getattr(m, f"{prefix}Seq2SeqLM")(
            backbone, preprocessor=getattr(
                m, f"{prefix}Seq2SeqLMPreprocessor")(
                tokenizer, encoder_sequence_length=8,
                decoder_sequence_length=8))
        return task, hub_models.pairs(8, seed=1), None
    return build


# Gemma 3n's tokenizer looks for all of these.
_GEMMA3N_PIECES = (
    "<image_soft_token>", "<audio_soft_token>", "<start_of_image>",
    "<end_of_image>", "<start_of_audio>", "<end_of_audio>",
    "<start_of_turn>", "<end_of_turn>", "<mask>", "[multimodal]")


def _gemma3n(seed=0):
    """Gemma3nCausalLM, text only: one decoder block with its AltUp
    (2 streams), LAuReL (rank 1) and per-layer inputs."""
    m = _hub()
    keras.utils.set_random_seed(seed)
    tokenizer = m.Gemma3nTokenizer(
        **_spm(bos="<bos>", eos="<eos>", extra=_GEMMA3N_PIECES)())
    vocabulary = tokenizer.vocabulary_size()
    backbone = m.Gemma3nBackbone(
        text_vocab_size=vocabulary, text_hidden_size=8, num_hidden_layers=1,
        pad_token_id=0, num_attention_heads=2, num_key_value_heads=1,
        head_dim=4, intermediate_size=[16],
        hidden_activation="gelu_approximate", layer_types=["full_attention"],
        sliding_window=4, rope_theta=10000.0, max_position_embeddings=16,
        vocab_size_per_layer_input=vocabulary, hidden_size_per_layer_input=2,
        altup_num_inputs=2, laurel_rank=1)
    preprocessor = m.Gemma3nCausalLMPreprocessor(
        tokenizer, sequence_length=8, max_images_per_prompt=0,
        num_vision_tokens_per_image=0, max_audios_per_prompt=0,
        num_audio_tokens_per_audio=0)
    return (m.Gemma3nCausalLM(preprocessor=preprocessor, backbone=backbone),
            _prompts_and_responses(), None)


def _blip2(language_model):
    """BLIP2{CausalLM, Seq2SeqLM} on 16 x 16 images and text: a ViT (patches
    of 8), a Q-Former of 2 query tokens, and OPT or Flan-T5."""
    def build(seed=0):
        import keras_hub

        m = _hub()
        keras.utils.set_random_seed(seed)
        vision = m.BLIP2VisionEncoder(
            image_size=16, patch_size=8, num_layers=1, num_heads=2,
            hidden_dim=8, intermediate_dim=16, use_patch_bias=True,
            use_class_token=True, use_mha_bias=True, use_mlp_bias=True,
            dropout_rate=0.0, layer_norm_epsilon=1e-6,
            initializer_range=0.02)
        qformer = m.BLIP2QFormer(
            num_query_tokens=2, num_layers=1, num_heads=2, hidden_dim=8,
            intermediate_dim=16, vision_dim=8, cross_attention_frequency=1,
            dropout=0.0, layer_norm_epsilon=1e-6)
        converter = keras_hub.layers.BLIP2ImageConverter(image_size=(16, 16))
        lm = dict(num_layers=1, num_heads=2, hidden_dim=8,
                  intermediate_dim=16, num_query_tokens=2,
                  qformer_hidden_dim=8, dropout=0.0)
        images = hub_models.raw_images(8, seed=1)[0]
        if language_model == "OPT":
            tokenizer = m.BLIP2OPTTokenizer(vocabulary=_bpe(
                {"<pad>": 0, "</s>": 1, "\u010a": 2, "<image>": 3}),
                merges=_MERGES)
            backbone = m.BLIP2Backbone(vision, qformer, m.BLIP2CustomOPT(
                vocabulary_size=tokenizer.vocabulary_size(),
                max_sequence_length=16, **lm))
            return m.BLIP2CausalLM(
                preprocessor=m.BLIP2CausalLMPreprocessor(
                    tokenizer, image_converter=converter, sequence_length=8),
                backbone=backbone), {
                    "images": images,
                    "text": hub_models.sentences(8, seed=1)}, None
        tokenizer = m.BLIP2FlanT5Tokenizer(**_spm()())
        backbone = m.BLIP2Backbone(vision, qformer, m.BLIP2FlanT5(
            vocabulary_size=tokenizer.vocabulary_size(), **lm))
        return m.BLIP2Seq2SeqLM(
            backbone, preprocessor=m.BLIP2Seq2SeqLMPreprocessor(
                tokenizer, image_converter=converter,
                encoder_sequence_length=8, decoder_sequence_length=8)), {
                    "images": images, **hub_models.pairs(8, seed=1)}, None
    return build


def _gemma4_assistant(seed=0):
    """Gemma4AssistantCausalLM, a draft model for speculative decoding:
    its `call` raises, so its own `fit` cannot train it (see UNTRAINABLE)."""
    m = _hub()
    keras.utils.set_random_seed(seed)
    backbone = m.Gemma4Backbone(vocabulary_size=16, image_size=None,
                                num_kv_shared_layers=1, **_GEMMA)
    task = m.Gemma4AssistantCausalLM(
        backbone, backbone_hidden_size=8, num_centroids=4,
        centroid_intermediate_top_k=2, use_ordered_embeddings=True)
    ids, targets = _token_ids(1)
    x = {"token_ids": ids, "padding_mask": np.ones_like(ids),
         "position_ids": np.tile(np.arange(ids.shape[1]), (len(ids), 1))}
    return task, x, targets


def _depth_anything(seed=0):
    """DepthAnythingDepthEstimator (metric depth up to 2, its own
    scale-invariant log loss) over a DINOv2 of 16 x 16 images."""
    m = _hub()
    keras.utils.set_random_seed(seed)
    encoder = m.DINOV2Backbone(
        patch_size=4, num_layers=2, hidden_dim=8, num_heads=2,
        intermediate_dim=16, image_shape=(16, 16, 3),
        position_embedding_shape=(16, 16))
    backbone = m.DepthAnythingBackbone(
        image_encoder=encoder, reassemble_factors=[2, 1],
        neck_hidden_dims=[4, 8], fusion_hidden_dim=8, head_hidden_dim=4,
        head_in_index=-1, feature_keys=["stage1", "stage2"])
    task = m.DepthAnythingDepthEstimator(
        backbone, depth_estimation_type="metric", max_depth=2.0,
        preprocessor=None)
    rng = np.random.default_rng(seed + 1)
    images = rng.uniform(size=(8, 16, 16, 3)).astype("float32")
    depths = rng.uniform(0.1, 1.0, size=(8, 16, 16, 1)).astype("float32")
    return task, images, {"depths": depths}


_DECODER = dict(max_sequence_length=8, dropout=0.0, **_SMALL)

BUILDERS = {
    "BertTextClassifier": _text_classifier("Bert", _wordpiece),
    "DistilBertTextClassifier": _text_classifier("DistilBert", _wordpiece),
    "RobertaTextClassifier": _text_classifier("Roberta", _roberta),
    "RoformerV2TextClassifier": _sequence_classifier(
        "RoformerV2", _wordpiece, _ROFORMER,
        lambda seed: hub_models.reviews(16, seed=1)),
    "RoformerV2MaskedLM": _masked_lm("RoformerV2", _wordpiece,
                                     backbone_args=_ROFORMER),
    "ESMProteinClassifier": _sequence_classifier(
        "ESM", _esm_vocabulary, _ESM, _labelled_proteins, backbone="ESM2",
        task="ProteinClassifier", sequence_length=12),
    "ESMMaskedPLM": _masked_lm("ESM", _esm_vocabulary, _proteins,
                               backbone_args=_ESM, task="MaskedPLM"),
    "ESM2MaskedPLM": _masked_lm("ESM", _esm_vocabulary, _proteins,
                                backbone_args=_ESM, backbone="ESM2",
                                task="MaskedPLM"),
    "BertMaskedLM": _masked_lm("Bert", _wordpiece),
    "DistilBertMaskedLM": _masked_lm("DistilBert", _wordpiece),
    "RobertaMaskedLM": _masked_lm(
        "Roberta", _roberta, lambda: hub_models.sentences(16, seed=1)),
    "GPT2CausalLM": _causal_lm("GPT2", _gpt2_style, _DECODER),
    "OPTCausalLM": _causal_lm("OPT", _opt, _DECODER),
    "GPTNeoXCausalLM": _causal_lm("GPTNeoX", _gpt2_style,
                                  dict(_DECODER, rotary_percentage=0.5)),
    "BloomCausalLM": _causal_lm("Bloom", _bloom, _SMALL),
    "FalconCausalLM": _causal_lm("Falcon", _gpt2_style, dict(
        num_layers=1, num_attention_heads=2, hidden_dim=8,
        intermediate_dim=16)),
    "QwenCausalLM": _causal_lm("Qwen", _qwen, _GQA),
    "Qwen3CausalLM": _causal_lm("Qwen3", _qwen, dict(_GQA, head_dim=4)),
    "Llama3CausalLM": _causal_lm("Llama3", _llama3, _GQA),
    "Qwen2CausalLM": _causal_lm("Qwen2", _qwen, _GQA),
    # Mixtures of experts (top-1 of 2): a router, and an auxiliary loss.
    "QwenMoeCausalLM": _causal_lm("QwenMoe", _qwen, dict(
        _GQA, moe_intermediate_dim=8, shared_expert_intermediate_dim=8,
        num_experts=2, top_k=1)),
    "Qwen3MoeCausalLM": _causal_lm("Qwen3Moe", _qwen, dict(
        _GQA, head_dim=4, moe_intermediate_dim=8, num_experts=2, top_k=1)),
    "BartSeq2SeqLM": _seq2seq,
    # SentencePiece tokenizers, from a model proto trained in memory.
    "GemmaCausalLM": _causal_lm("Gemma", _spm(bos="<bos>", eos="<eos>"),
                                _GEMMA),
    "Gemma3CausalLM": _causal_lm(
        "Gemma3", _spm(bos="<bos>", eos="<eos>", has_vision_tokens=False),
        dict(_GEMMA, image_size=None), _prompts_and_responses),
    "LlamaCausalLM": _causal_lm("Llama", _spm(), _GQA),
    "MistralCausalLM": _causal_lm("Mistral", _spm(),
                                  dict(_GQA, sliding_window=8)),
    "MixtralCausalLM": _causal_lm("Mixtral", _spm(), dict(
        _GQA, num_experts=2, top_k=1, sliding_window=8)),
    "Phi3CausalLM": _causal_lm("Phi3", _spm(eos="<|endoftext|>"), dict(
        _GQA, max_sequence_length=8, pretraining_sequence_length=8)),
    "AlbertTextClassifier": _text_classifier(
        "Albert", _spm(bos="[CLS]", eos="[SEP]", extra=("[MASK]",)),
        dict(_SMALL, embedding_dim=8)),
    "AlbertMaskedLM": _masked_lm("Albert", _BERT_SPM, backbone_args=dict(
        _SMALL, embedding_dim=8, max_sequence_length=8)),
    "FNetTextClassifier": _text_classifier(
        "FNet", _BERT_SPM, dict(num_layers=1, hidden_dim=8,
                                intermediate_dim=16)),
    "FNetMaskedLM": _masked_lm("FNet", _BERT_SPM, backbone_args=dict(
        num_layers=1, hidden_dim=8, intermediate_dim=16,
        max_sequence_length=8, dropout=0.0)),
    "DebertaV3TextClassifier": _text_classifier(
        "DebertaV3", _spm(pad="[PAD]", unk="[UNK]", bos="[CLS]",
                          eos="[SEP]", extra=("[MASK]",)),
        dict(_SMALL, bucket_size=4)),
    "DebertaV3MaskedLM": _masked_lm(
        "DebertaV3", _spm(pad="[PAD]", unk="[UNK]", bos="[CLS]",
                          eos="[SEP]", extra=("[MASK]",)),
        backbone_args=dict(_SMALL, bucket_size=4, max_sequence_length=8,
                           dropout=0.0)),
    "XLMRobertaTextClassifier": _text_classifier(
        "XLMRoberta", _spm(extra=("<mask>",))),
    "XLMRobertaMaskedLM": _masked_lm("XLMRoberta", _spm(extra=("<mask>",))),
    "XLMRobertaTextEmbedder": _embedder(
        "XLMRoberta", _spm(extra=("<mask>",)), _DECODER),
    "BertTextEmbedder": _embedder("Bert", _wordpiece, _DECODER),
    "Qwen3TextEmbedder": _embedder("Qwen3", _qwen, dict(_GQA, head_dim=4)),
    "Gemma3TextEmbedder": _embedder(
        "Gemma3", _spm(bos="<bos>", eos="<eos>", has_vision_tokens=False),
        dict(_GEMMA, image_size=None)),
    "Gemma4CausalLM": _causal_lm(
        "Gemma4", _spm(bos="<bos>", eos="<eos>", has_vision_tokens=False,
                       has_video_tokens=False),
        dict(_GEMMA, image_size=None), _prompts_and_responses),
    # A gated delta-net (linear attention) layer and a full attention one.
    "Qwen3_5CausalLM": _causal_lm("Qwen3_5", _qwen3_5, dict(
        _QWEN3_5, intermediate_dim=16)),
    "Qwen3_5MoeCausalLM": _causal_lm("Qwen3_5Moe", _qwen3_5, dict(
        _QWEN3_5, moe_intermediate_dim=8, shared_expert_intermediate_size=8,
        num_experts=2, top_k=1)),
    "T5Seq2SeqLM": _t5,
    "PaliGemmaCausalLM": _pali_gemma,
    "PARSeqCausalLM": _parseq,
    "GptOssCausalLM": _causal_lm("GptOss", _gpt2_style, dict(
        _GQA, num_experts=2, top_k=1, sliding_window=8, head_dim=4)),
    "SmolLM3CausalLM": _causal_lm("SmolLM3", lambda: dict(
        vocabulary=_bpe({"<|end_of_text|>": 0, "<|begin_of_text|>": 1,
                         "<think>": 2, "</think>": 3}),
        merges=_MERGES), dict(
        hidden_dim=8, intermediate_dim=16, num_layers=1,
        num_attention_heads=2, num_key_value_heads=1, attention_bias=False,
        attention_dropout=0.0, rope_layer_enabled_list=[True],
        layer_types=["full_attention"], mlp_bias=False,
        layer_norm_epsilon=1e-6, max_position_embeddings=8,
        rope_theta=10000.0, partial_rotary_factor=1.0)),
    "ResNetImageClassifier": _image_classifier("ResNet", dict(
        input_conv_filters=[64], input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64], stackwise_num_blocks=[1],
        stackwise_num_strides=[1], block_type="basic_block",
        use_pre_activation=False, image_shape=(16, 16, 3))),
    "VGGImageClassifier": _image_classifier(
        "VGG", dict(stackwise_num_repeats=[1], stackwise_num_filters=[4],
                    image_shape=(16, 16, 3)),
        dict(pooling_hidden_dim=8)),
    "ViTImageClassifier": _image_classifier("ViT", dict(
        image_shape=(16, 16, 3), patch_size=4, num_layers=1, num_heads=2,
        hidden_dim=8, mlp_dim=16)),
    "DeiTImageClassifier": _image_classifier("DeiT", dict(
        image_shape=(16, 16, 3), patch_size=4, num_layers=1, num_heads=2,
        hidden_dim=8, intermediate_dim=16)),
    "DenseNetImageClassifier": _image_classifier("DenseNet", dict(
        stackwise_num_repeats=[1, 1], image_shape=(16, 16, 3),
        growth_rate=4)),
    "XceptionImageClassifier": _image_classifier("Xception", dict(
        stackwise_conv_filters=[[8, 8], [8, 8]],
        stackwise_pooling=[True, False], image_shape=(16, 16, 3))),
    "MiTImageClassifier": _image_classifier("MiT", dict(
        layerwise_depths=[1, 1], num_layers=2, layerwise_num_heads=[1, 2],
        layerwise_sr_ratios=[2, 1], max_drop_path_rate=0.0,
        layerwise_patch_sizes=[3, 3], layerwise_strides=[2, 2],
        image_shape=(16, 16, 3), hidden_dims=[8, 8])),
    "SwinTransformerImageClassifier": _image_classifier(
        "SwinTransformer", dict(image_shape=(16, 16, 3), embed_dim=8,
                                depths=[1], num_heads=[2], window_size=2,
                                patch_size=4, drop_path=0.0)),
    "CSPNetImageClassifier": _image_classifier("CSPNet", dict(
        stem_filters=8, stem_kernel_size=3, stem_strides=2,
        stackwise_depth=[1], stackwise_strides=[2],
        stackwise_num_filters=[8], block_type="dark_block",
        stage_type="csp", expand_ratio=[2.0], bottle_ratio=[0.5],
        block_ratio=[1.0], image_shape=(16, 16, 3))),
    "EfficientNetImageClassifier": _image_classifier("EfficientNet", dict(
        stackwise_width_coefficients=[1.0],
        stackwise_depth_coefficients=[1.0], stackwise_kernel_sizes=[3],
        stackwise_num_repeats=[1], stackwise_input_filters=[8],
        stackwise_output_filters=[8], stackwise_expansion_ratios=[1],
        stackwise_squeeze_and_excite_ratios=[0.25], stackwise_strides=[1],
        stackwise_block_types=["unfused"], stackwise_force_input_filters=[0],
        stackwise_nores_option=[False], num_features=16, dropout=0.0,
        input_shape=(16, 16, 3))),
    "MobileNetImageClassifier": _image_classifier("MobileNet", dict(
        stackwise_expansion=[[1]], stackwise_num_blocks=[1],
        stackwise_num_filters=[[8]], stackwise_kernel_size=[[3]],
        stackwise_num_strides=[[1]], stackwise_se_ratio=[[0.25]],
        stackwise_activation=[["relu"]], stackwise_padding=[[1]],
        output_num_filters=16, depthwise_filters=8, depthwise_stride=2,
        depthwise_residual=False, last_layer_filter=16, input_num_filters=8,
        image_shape=(16, 16, 3))),
    "HGNetV2ImageClassifier": _image_classifier("HGNetV2", dict(
        depths=[1], embedding_size=8, hidden_sizes=[16],
        stem_channels=[3, 8, 8], hidden_act="relu",
        use_learnable_affine_block=False,
        stackwise_stage_filters=[[8, 8, 16, 1, 1, 3]],
        apply_downsample=[False], use_lightweight_conv_block=[False],
        image_shape=(16, 16, 3))),
    "MobileNetV5ImageClassifier": _image_classifier("MobileNetV5", dict(
        stackwise_block_types=[["er"], ["uir"]], stackwise_num_blocks=[1, 1],
        stackwise_num_filters=[[8], [16]], stackwise_strides=[[2], [2]],
        stackwise_act_layers=[["relu"], ["relu"]],
        stackwise_exp_ratios=[[2.0], [2.0]], stackwise_se_ratios=[[0.0], [0.0]],
        stackwise_dw_kernel_sizes=[[0], [3]],
        stackwise_dw_start_kernel_sizes=[[0], [0]],
        stackwise_dw_end_kernel_sizes=[[0], [0]],
        stackwise_exp_kernel_sizes=[[3], [0]],
        stackwise_pw_kernel_sizes=[[1], [0]], stackwise_num_heads=[[0], [0]],
        stackwise_key_dims=[[0], [0]], stackwise_value_dims=[[0], [0]],
        stackwise_kv_strides=[[0], [0]], stackwise_use_cpe=[[False], [False]],
        use_msfa=False, stem_size=8, num_features=16,
        image_shape=(16, 16, 3))),
    "RWKV7CausalLM": _rwkv7,
    "MoonshineAudioToText": _moonshine,
    "EdRecSeq2SeqLM": _edrec,
    "T5GemmaSeq2SeqLM": _t5gemma("T5Gemma"),
    "T5Gemma2Seq2SeqLM": _t5gemma("T5Gemma2"),
    "Gemma3nCausalLM": _gemma3n,
    "BLIP2CausalLM": _blip2("OPT"),
    "BLIP2Seq2SeqLM": _blip2("FlanT5"),
    "DepthAnythingDepthEstimator": _depth_anything,
    "BASNetImageSegmenter": _basnet,
    "DeepLabV3ImageSegmenter": _deeplab,
    "SegFormerImageSegmenter": _segformer,
    "RetinaNetObjectDetector": _retinanet,
    "DFineObjectDetector": _dfine,
}

# Abstract bases: the families above, not tasks of their own.
BASES = {"Task", "CausalLM", "Seq2SeqLM", "MaskedLM", "TextClassifier",
         "Classifier", "ImageClassifier", "ImageSegmenter", "ObjectDetector",
         "ImageObjectDetector", "TextEmbedder", "TextToImage", "ImageToImage",
         "Inpaint", "DepthEstimator", "AudioToText"}
# Aliases KerasHub keeps for older names.
ALIASES = {"BertClassifier", "DistilBertClassifier", "RobertaClassifier",
           "AlbertClassifier", "DebertaV3Classifier", "FNetClassifier",
           "XLMRobertaClassifier", "SmolLMCausalLM"}

NOT_BUILT: dict = {}   # every class is built or refused
_OWN_FIT = ("inference only: its own `fit` raises NotImplementedError; "
            "SAMModel refuses a model with a `fit` of its own, at "
            "construction, with what to do")
# Built, but their own `fit` cannot train them: SAMModel(task).fit fails
# with the task's own error (test_kerashub_zoo.py), never trains otherwise.
UNTRAINABLE = {
    "Gemma4AssistantCausalLM": (_gemma4_assistant, (
        "its own fit cannot train it: a draft model for speculative "
        "decoding, whose `call` raises NotImplementedError; "
        "SAMModel(task).fit raises with that message")),
}
_NOT_YET = ("no offline builder in this zoo yet: a config and tokenizer or "
            "image converter of its own to write")


def task_classes() -> list:
    """The names of the task classes `keras_hub.models` exports."""
    m = _hub()
    from keras_hub.src.models.task import Task

    return sorted(name for name, obj in vars(m).items()
                  if inspect.isclass(obj) and issubclass(obj, Task)
                  and name not in BASES and name not in ALIASES)


def status(name: str) -> str:
    """"built", or why not."""
    if name in BUILDERS:
        return "built"
    if name in UNTRAINABLE:
        return UNTRAINABLE[name][1]
    from keras_sam import objective

    if objective.overrides(getattr(_hub(), name), "fit"):
        return _OWN_FIT
    return NOT_BUILT.get(name, _NOT_YET)


def own_compute_loss(name: str) -> bool:
    cls = getattr(_hub(), name)
    return any("compute_loss" in vars(k) for k in cls.__mro__
               if k.__module__.startswith("keras_hub"))


def _relative(a, b) -> float:
    """max |a - b| over max |b|, the gap relative to the tensor's scale
    (at least SCALE: a tensor that stays near 0 is compared absolutely)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), SCALE))


def _head(tree, n):
    """The first n examples of every array in `tree` (None stays None)."""
    if tree is None:
        return None
    if isinstance(tree, (tuple, list)):
        return type(tree)(_head(t, n) for t in tree)
    if isinstance(tree, dict):
        return {k: _head(v, n) for k, v in tree.items()}
    return tree[:n]


def _fit(model, x, y, epochs=2):
    sample_weight = None
    if isinstance(y, tuple):   # (y, sample_weight) of a masked LM
        y, sample_weight = y
    return model.fit(x, y, sample_weight=sample_weight, batch_size=4,
                     epochs=epochs, shuffle=False, verbose=0)


def conformance(name: str) -> dict:
    """SAMModel(task, rho=0).fit against task.fit (2 epochs of 2 to 4
    batches, the task's default compile), predict, then one SAM step at
    rho = 0.05. Returns the largest relative gaps and the step's outcome."""
    import keras_sam

    build = BUILDERS[name]
    task, x, y = build()
    twin, _, _ = build()
    twin.set_weights(task.get_weights())
    if getattr(twin, "preprocessor", None) is not None:
        # One preprocessor for both: with TensorFlow Text, a second
        # SentencePiece tokenizer of the same proto leaves the first one's
        # resource missing in tf.data ("SentencepieceOp ... does not
        # exist", tensorflow/text issue 374).
        task.preprocessor = twin.preprocessor
    arguments = COMPILE.get(name, {})
    sam = keras_sam.SAMModel(twin, rho=0.0)
    sam.compile(**arguments)
    if not task.compiled or arguments:
        task.compile(**arguments)
    expected = _fit(task, x, y).history
    got = _fit(sam, x, y).history
    weights = max((_relative(a, b) for a, b in
                   zip(twin.get_weights(), task.get_weights())), default=0.0)
    try:
        predict = _relative(sam.predict(x, verbose=0),
                            task.predict(x, verbose=0))
    except Exception:   # the task's own predict takes no such input
        predict = None
    keras_names = set(expected) | {"sharpness"}
    step = keras_sam.SAMModel(build(seed=1)[0], rho=0.05)
    step.compile(**arguments)
    before = [np.array(w) for w in step.model.get_weights()]
    first = _head((x, y), 4)
    loss = _fit(step, *first, epochs=1).history["loss"][0]
    moved = max(float(np.max(np.abs(a - b))) for a, b in
                zip(before, step.model.get_weights()))
    return dict(
        losses=expected["loss"], loss_gap=_relative(got["loss"],
                                                     expected["loss"]),
        weight_gap=weights, predict_gap=predict,
        same_logs=set(got) == keras_names,
        step_finite=bool(np.isfinite(loss)), moved=moved)
