"""Putting a checkpoint's tensors into a model: the names and shapes checked against the config before any work,
the quantized linears swapped for QuantLinear (or decoded back to dense weights), everything else filled in place.

The caller builds the model (on the meta device, so loading needs about one copy of the weights) and passes it in:
this module reads files through `checkpoint` and never imports `model`.
"""
import functools
from typing import Optional

import torch

from .checkpoint import WeightReader, resolve_model_path
from .config import QwenConfig
from .layout import GPTQ_OPTIONAL, GPTQ_REQUIRED, GPTQ_TENSORS, layout_of
from .qlinear import QuantLinear, join_outputs, validate_on
from .tokenizer import tokenizer_id_count


def open_checkpoint(path_or_name, allow_pickle: bool = False) -> tuple[QwenConfig, WeightReader]:
    """The config and weights of a folder or published name, the tensors' names and shapes already checked."""
    folder = resolve_model_path(path_or_name)
    config = QwenConfig.from_file(folder)
    reader = WeightReader(folder, allow_pickle=allow_pickle)
    check_tensors(reader, config)
    return config, reader


def block_tensor_shapes(config: QwenConfig) -> tuple[dict, set]:
    """(name inside a block -> shape, or None where the packing decides it; names a block may leave out)."""
    layout = layout_of(config)
    shapes = {f"{norm}.weight": (config.hidden_size,) for norm in layout.norms}
    shapes.update({f"{norm}.weight": (config.head_dim,) for norm in layout.qk_norms})
    optional = set()
    for path, (k, n, bias) in layout.linear_shapes(config).items():
        if config.quantization_config is not None:  # packed shapes are checked where the packing is known (qlinear)
            shapes.update({f"{path}.{t}": None for t in GPTQ_REQUIRED})
            optional |= {f"{path}.{t}" for t in GPTQ_OPTIONAL}
            continue
        shapes[f"{path}.weight"] = (n, k)
        if bias:
            shapes[f"{path}.bias"] = (n,)
    return shapes, optional


def check_tensors(reader: WeightReader, config: QwenConfig) -> None:
    """The checkpoint's tensor names and shapes (from the headers: nothing is read) against the ones the config
    implies, before any model is built: a block more or less, or a vocabulary the embedding lacks, is an error. With
    tie_word_embeddings the head is the embedding: a checkpoint may leave lm_head.weight out (transformers does)."""
    layout = layout_of(config)
    block, optional = block_tensor_shapes(config)
    h, vocab = config.hidden_size, config.vocab_size
    top = {layout.embedding: (vocab, h), layout.final_norm: (h,), layout.lm_head: (vocab, h)}
    optional_top = {layout.lm_head} if config.tie_word_embeddings else set()
    layers = config.num_hidden_layers
    block_tensor = layout.block_tensor
    unexpected, blocks = [], set()
    for name in reader.names():
        match = block_tensor.fullmatch(name)
        if match and int(match[1]) < layers and (match[2] in block or match[2] in optional):
            blocks.add(int(match[1]))
        elif name not in top:
            unexpected.append(name)
    if unexpected:
        raise ValueError(f"unexpected tensor(s) in the checkpoint in {reader.folder} (its config.json has "
                         f"num_hidden_layers {layers}): {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    missing_block = next((i for i in range(layers) if i not in blocks), None)
    if missing_block is not None:
        raise KeyError(f"tensor {layout.block_prefix(missing_block)}{layout.norms[0]}.weight is missing from the "
                       f"checkpoint in "
                       f"{reader.folder}: config.json has num_hidden_layers {layers}, the checkpoint "
                       f"{len(blocks)} block(s)")
    expected = dict(top)
    for i in range(layers):
        expected.update({layout.block_prefix(i) + name: shape for name, shape in block.items()})
    for name, shape in expected.items():
        if name not in reader and name in optional_top:
            continue
        if name not in reader:
            raise KeyError(f"tensor {name} is missing from the checkpoint in {reader.folder}")
        if shape is not None and reader.shape(name) != shape:
            raise ValueError(f"tensor {name} has shape {list(reader.shape(name))}, the config needs {list(shape)}")


def fill_module(module: torch.nn.Module, reader: WeightReader, prefix: str, dtype, device) -> None:
    """Replace module's meta parameters with the checkpoint's tensors, converted one at a time. Names and shapes
    were checked by check_tensors; a float weight stored as integers is caught here, where it is read. A Parameter
    shared by two modules (a head tied to the embedding) is read once, under its first name, and stays shared."""
    filled = {}  # id of a meta Parameter -> its filled replacement
    for name, param in list(module.named_parameters(remove_duplicate=False)):
        if not param.is_meta:  # filled already (the dense linears of load_dequantized_weights)
            continue
        owner, _, leaf = name.rpartition(".")
        target = module.get_submodule(owner) if owner else module
        if id(param) not in filled:
            full = prefix + name
            tensor = reader.get(full)
            if not tensor.is_floating_point():
                raise ValueError(f"tensor {full} has dtype {str(tensor.dtype).removeprefix('torch.')}, but it is a "
                                 "float weight: the checkpoint is corrupt")
            filled[id(param)] = torch.nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False)
        setattr(target, leaf, filled[id(param)])


def limit_vocabulary(model: torch.nn.Module, folder) -> None:
    """Sample only the ids the folder's tokenizer.json gives, when it has one (else the layout's default stays)."""
    model.real_vocab = tokenizer_id_count(folder) or model.real_vocab


def default_dtype(config: QwenConfig, quantized: bool, device) -> torch.dtype:
    """The activation dtype when none is asked for: the config's for a dense model; for a quantized one fp16 on CUDA
    (the Triton kernels' dtype) and bf16 elsewhere (the cpu kernels')."""
    if not quantized:
        return config.dtype
    return torch.float16 if torch.device(device or "cpu").type == "cuda" else torch.bfloat16


def validated_linear(reader: WeightReader, quant, name: str, dense: torch.nn.Linear, device) -> tuple:
    """The quantized linear `name`'s tensors read and checked against the config's quantization and the dense
    module's shape (qlinear.validate_on, on `device`): (SortedGptqWeight, perm, bias)."""
    tensors = (reader.get(f"{name}.{t}") if f"{name}.{t}" in reader else None for t in GPTQ_TENSORS)
    return validate_on(torch.device(device), *tensors, bits=quant.bits, group_size=quant.group_size,
                       checkpoint_format=quant.checkpoint_format, in_features=dense.in_features,
                       out_features=dense.out_features, name=name, sym=quant.sym, desc_act=quant.desc_act)


def load_weights(model: torch.nn.Module, reader: WeightReader, dtype: Optional[torch.dtype] = None, device=None,
                 backend: str = "auto") -> torch.nn.Module:
    """Fill `model` (a QwenForCausalLM built on the meta device from the checkpoint's config) from `reader`; a
    quantized checkpoint's linears become QuantLinear layers with `backend`. Returns the model in eval mode."""
    quant = model.config.quantization_config
    dtype = dtype or default_dtype(model.config, quant is not None, device)
    device = torch.device(device or "cpu")
    layout = layout_of(model.config)
    if quant is not None:
        build = functools.partial(QuantLinear.from_sorted, group_size=quant.group_size, backend=backend, dtype=dtype,
                                  device=device)
        for i, block in enumerate(model.blocks):
            prefix = layout.block_prefix(i)
            validated = {path: validated_linear(reader, quant, prefix + path, block.get_submodule(path), device)
                         for path in layout.linears}
            # Linears that read one input run as one matmul where their weights allow (join_outputs): a decode
            # step's calls and launches are a large part of its time on small models.
            for joined, siblings in layout.siblings.items():
                parts = join_outputs([validated[path] for path in siblings])
                if parts is not None:
                    block.join(joined, build(*parts, name=prefix + joined))
                    for path in siblings:
                        del validated[path]
            for path, parts in validated.items():
                owner, _, leaf = path.rpartition(".")
                setattr(block.get_submodule(owner), leaf, build(*parts, name=prefix + path))
    fill_module(model, reader, "", dtype, device)
    limit_vocabulary(model, reader.folder)
    return model.eval()


def load_dequantized_weights(model: torch.nn.Module, reader: WeightReader, dtype=torch.float32,
                             device=None) -> torch.nn.Module:
    """Fill `model` (built on the meta device from a quantized checkpoint's config) with every quantized linear's
    weight decoded back to dtype: the reference the quantized runtime is tested against, and how quantization
    quality is measured."""
    quant = model.config.quantization_config
    if quant is None:
        raise ValueError(f"{reader.folder} is not a quantized checkpoint (config.json has no quantization_config)")
    layout = layout_of(model.config)
    for i, block in enumerate(model.blocks):
        for path in layout.linears:
            linear = block.get_submodule(path)
            # The same checks as load_weights' (shapes, finite scales, zero points against sym), then the weight
            # the sorted tensors describe, back in the checkpoint's input order.
            sorted_weight, perm, bias = validated_linear(reader, quant, layout.block_prefix(i) + path, linear, "cpu")
            w = sorted_weight.dequantize(perm)
            linear.weight = torch.nn.Parameter(w.to(device=device, dtype=dtype), requires_grad=False)
            linear.bias = None if bias is None else torch.nn.Parameter(bias.to(device=device, dtype=dtype),
                                                                       requires_grad=False)
    fill_module(model, reader, "", dtype, device)
    limit_vocabulary(model, reader.folder)
    return model.eval()
