"""The graphs a diffusion model is served with, assembled at load time from its exported `denoiser`.

Why graphs and not numpy: on a GPU the whole iteration (gather the rows' state, the denoiser, guidance, the
sampler's update, scatter the state back) must stay on the device, so it is one ONNX graph that onnxruntime runs
with IO binding (serve/session.py). Built with onnx.helper from what the manifest carries (image shape, classes,
the null class); the sampler maths enters only as per-row coefficient inputs (serve/samplers/), so a new sampler
needs no new graph and no re-export.

`iteration`: inputs
    state [P, S + 2, C, H, W]  every resident row's sampler state (x first), then its known image and mask
                           (image-to-image and inpainting: serve/diffusion.py), P slots
    slots [B] int64        the slots of this iteration's rows
    t [B]                  their times, the denoiser's own `t` type (int64 timesteps or float32 t)
    label [B] int64, guidance [B] float32     (conditional models only)
    conv [B, 3] float32    x0 = conv[0] x + conv[1] out, clipped to [-conv[2], conv[2]] where conv[2] > 0
    coef [B, S, S + 2]     the update: new_state = coef @ (*state, x0, noise)
    noise [B, C, H, W]
    blend [B, 2] float32   (a, s): where the mask is 0 the new sample is replaced by a known + s noise, the known
                           image noised to the step's end (RePaint's replacement); a plain row's mask is all ones
outputs: state_out (state with these rows' new state), x [B, C, H, W] (their new sample), x0 [B, C, H, W].
Guidance is one doubled batch: rows with their label, then the same rows with the null class K,
out = uncond + w (cond - uncond); a distilled student's denoiser takes w as an input instead (one row per image).

`admit`: state, slots [B], values [B, S + 2, C, H, W] -> state_out (new rows written into their slots).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DEN = "denoiser/"  # prefix of the denoiser's own inputs and output inside the iteration graph
KNOWN = 2  # pool entries per row after the sampler state: the known image and the mask (1 = regenerate)
INT64_MAX = np.iinfo(np.int64).max


def _const(name: str, value) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name))


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def iteration_model(denoiser: onnx.ModelProto, image_shape: tuple[int, int, int], state_size: int,
                    num_classes: int, null_class: bool = True) -> onnx.ModelProto:
    """The iteration graph around a copy of `denoiser` (inputs x_t, t [, label [, guidance]]; output `output`).
    A conditional model without the null class (`null_class` False) runs its rows once with their labels: its
    `guidance` input is there, unused (the server admits only 1)."""
    C, H, W = image_shape
    S, D = state_size, C * H * W
    model = onnx.ModelProto()
    model.CopyFrom(denoiser)
    g = model.graph
    names = {i.name for i in g.input}
    if not {"x_t", "t"} <= names or g.output[0].name != "output":
        raise ValueError(f"denoiser: expected inputs x_t, t [, label] and output 'output', got {sorted(names)}")
    conditional = "label" in names
    t_type = next(i.type.tensor_type.elem_type for i in g.input if i.name == "t")
    guided_input = "guidance" in names  # a student: guidance is the denoiser's input, not a doubled batch
    if guided_input and not conditional:
        raise ValueError("denoiser: a guidance input needs a label input")
    if conditional != bool(num_classes):
        raise ValueError(f"denoiser: label input {'present' if conditional else 'absent'} but {num_classes} classes")
    rename = {n: DEN + n for n in (*names, "output")}
    for node in g.node:
        node.input[:] = [rename.get(v, v) for v in node.input]
        node.output[:] = [rename.get(v, v) for v in node.output]
    del g.input[:]
    del g.output[:]

    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [helper.make_tensor_value_info("state", f32, ["P", S + KNOWN, C, H, W]),
              helper.make_tensor_value_info("slots", i64, ["B"]),
              helper.make_tensor_value_info("t", t_type, ["B"])]
    if conditional:
        inputs += [helper.make_tensor_value_info("label", i64, ["B"]),
                   helper.make_tensor_value_info("guidance", f32, ["B"])]
    inputs += [helper.make_tensor_value_info("conv", f32, ["B", 3]),
               helper.make_tensor_value_info("coef", f32, ["B", S, S + 2]),
               helper.make_tensor_value_info("noise", f32, ["B", C, H, W]),
               helper.make_tensor_value_info("blend", f32, ["B", 2])]
    g.input.extend(inputs)
    g.output.extend([helper.make_tensor_value_info("state_out", f32, ["P", S + KNOWN, C, H, W]),
                     helper.make_tensor_value_info("x", f32, ["B", C, H, W]),
                     helper.make_tensor_value_info("x0", f32, ["B", C, H, W])])

    n = lambda op, ins, outs, **kw: helper.make_node(op, ins, outs, **kw)  # noqa: E731
    pre = [_const("it/zero", np.int64(0)), _const("it/axes123", np.array([1, 2, 3], np.int64)),
           _const("it/axis1", np.array([1], np.int64)),
           n("Gather", ["state", "slots"], ["it/all"], axis=0),  # [B, S + 2, C, H, W]
           _const("it/s0", np.array([0], np.int64)), _const("it/sS", np.array([S], np.int64)),
           n("Slice", ["it/all", "it/s0", "it/sS", "it/axis1"], ["it/cur"]),  # the sampler state [B, S, C, H, W]
           _const("it/kS", np.int64(S)), _const("it/kM", np.int64(S + 1)),
           n("Gather", ["it/all", "it/kS"], ["it/known"], axis=1),
           n("Gather", ["it/all", "it/kM"], ["it/mask"], axis=1),
           n("Gather", ["it/cur", "it/zero"], ["it/x_t"], axis=1)]  # the sample, state 0
    if guided_input:
        pre += [n("Identity", ["it/x_t"], [DEN + "x_t"]), n("Identity", ["t"], [DEN + "t"]),
                n("Identity", ["label"], [DEN + "label"]), n("Identity", ["guidance"], [DEN + "guidance"])]
    elif conditional and null_class:  # one doubled batch: (rows, label) then (rows, null class K)
        pre += [_const("it/null", np.int64(num_classes)), n("Shape", ["label"], ["it/B"]),
                n("Expand", ["it/null", "it/B"], ["it/nulls"]),
                n("Concat", ["it/x_t", "it/x_t"], [DEN + "x_t"], axis=0),
                n("Concat", ["t", "t"], [DEN + "t"], axis=0),
                n("Concat", ["label", "it/nulls"], [DEN + "label"], axis=0)]
    else:
        pre += [n("Identity", ["it/x_t"], [DEN + "x_t"]), n("Identity", ["t"], [DEN + "t"])]
        if conditional:
            pre += [n("Identity", ["label"], [DEN + "label"])]

    post = []
    if conditional and null_class and not guided_input:
        post += [_const("it/start0", np.array([0], np.int64)), _const("it/end", np.array([INT64_MAX], np.int64)),
                 _const("it/axis0", np.array([0], np.int64)),
                 n("Slice", [DEN + "output", "it/start0", "it/B", "it/axis0"], ["it/cond"]),
                 n("Slice", [DEN + "output", "it/B", "it/end", "it/axis0"], ["it/uncond"]),
                 n("Unsqueeze", ["guidance", "it/axes123"], ["it/w"]),
                 n("Sub", ["it/cond", "it/uncond"], ["it/diff"]),
                 n("Mul", ["it/w", "it/diff"], ["it/wdiff"]),
                 n("Add", ["it/uncond", "it/wdiff"], ["it/out"])]
    else:
        post += [n("Identity", [DEN + "output"], ["it/out"])]
    for k, name in enumerate(("cx", "co", "clip")):
        post += [_const(f"it/k{k}", np.int64(k)), n("Gather", ["conv", f"it/k{k}"], [f"it/{name}1"], axis=1),
                 n("Unsqueeze", [f"it/{name}1", "it/axes123"], [f"it/{name}"])]
    post += [n("Mul", ["it/cx", "it/x_t"], ["it/a"]), n("Mul", ["it/co", "it/out"], ["it/b"]),
             n("Add", ["it/a", "it/b"], ["it/x0raw"]),
             n("Neg", ["it/clip"], ["it/lo"]), n("Max", ["it/x0raw", "it/lo"], ["it/x0lo"]),
             n("Min", ["it/x0lo", "it/clip"], ["it/x0clip"]),
             _const("it/none", np.float32(0.0)), n("Greater", ["it/clip", "it/none"], ["it/doclip"]),
             n("Where", ["it/doclip", "it/x0clip", "it/x0raw"], ["x0"]),
             # terms (*state, x0, noise) as [B, S + 2, D]; one batched MatMul applies every row's own update
             n("Unsqueeze", ["x0", "it/axis1"], ["it/x0u"]), n("Unsqueeze", ["noise", "it/axis1"], ["it/nu"]),
             n("Concat", ["it/cur", "it/x0u", "it/nu"], ["it/terms5"], axis=1),
             _const("it/flat", np.array([0, S + 2, D], np.int64)),
             n("Reshape", ["it/terms5", "it/flat"], ["it/terms"]),
             n("MatMul", ["coef", "it/terms"], ["it/new3"]),
             _const("it/img", np.array([0, S, C, H, W], np.int64)),
             n("Reshape", ["it/new3", "it/img"], ["it/new"]),
             n("Gather", ["it/new", "it/zero"], ["it/xnew"], axis=1),
             # x = mask x_new + (1 - mask) (a known + s noise): the known region follows the known image's path
             _const("it/b0", np.int64(0)), _const("it/b1", np.int64(1)), _const("it/one", np.float32(1.0)),
             n("Gather", ["blend", "it/b0"], ["it/ba1"], axis=1), n("Gather", ["blend", "it/b1"], ["it/bs1"], axis=1),
             n("Unsqueeze", ["it/ba1", "it/axes123"], ["it/ba"]), n("Unsqueeze", ["it/bs1", "it/axes123"], ["it/bs"]),
             n("Mul", ["it/ba", "it/known"], ["it/ka"]), n("Mul", ["it/bs", "noise"], ["it/kn"]),
             n("Add", ["it/ka", "it/kn"], ["it/xknown"]),
             n("Mul", ["it/mask", "it/xnew"], ["it/xm"]), n("Sub", ["it/one", "it/mask"], ["it/inv"]),
             n("Mul", ["it/inv", "it/xknown"], ["it/xk"]), n("Add", ["it/xm", "it/xk"], ["x"]),
             n("Unsqueeze", ["x", "it/axis1"], ["it/xu"]),
             _const("it/s1", np.array([1], np.int64)),
             n("Slice", ["it/new", "it/s1", "it/sS", "it/axis1"], ["it/rest"]),  # the sampler's other state
             _const("it/sK", np.array([S + KNOWN], np.int64)),
             n("Slice", ["it/all", "it/sS", "it/sK", "it/axis1"], ["it/keep"]),  # known image and mask, unchanged
             n("Concat", ["it/xu", "it/rest", "it/keep"], ["it/row"], axis=1),
             n("Unsqueeze", ["slots", "it/axis1"], ["it/idx"]),
             n("ScatterND", ["state", "it/idx", "it/row"], ["state_out"])]
    nodes = list(g.node)
    del g.node[:]
    g.node.extend(pre + nodes + post)
    g.name = "gen_iteration"
    onnx.checker.check_model(model)
    return model


def admit_model(image_shape: tuple[int, int, int], state_size: int, opset: int = 18) -> onnx.ModelProto:
    """state_out = state with `values` written into `slots` (new rows joining the loop)."""
    C, H, W = image_shape
    state_size += KNOWN
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    nodes = [_const("axis1", np.array([1], np.int64)),
             helper.make_node("Unsqueeze", ["slots", "axis1"], ["idx"]),
             helper.make_node("ScatterND", ["state", "idx", "values"], ["state_out"])]
    graph = helper.make_graph(
        nodes, "gen_admit",
        [helper.make_tensor_value_info("state", f32, ["P", state_size, C, H, W]),
         helper.make_tensor_value_info("slots", i64, ["B"]),
         helper.make_tensor_value_info("values", f32, ["B", state_size, C, H, W])],
        [helper.make_tensor_value_info("state_out", f32, ["P", state_size, C, H, W])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model
