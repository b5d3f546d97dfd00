"""The large-kernel backend, measured (the default on CUDA, tested here on the CPU with both backends): one decision
per device model, dtype, memory format and per-sample shape, the same in training, validation and prediction, printed
once, switched off or forced by REP3D_CONV_BACKEND, taken before torch.compile traces and before training, equal on
every DDP rank, recorded with the model and read back where it is predicted on the same device model."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rep3d_nnunet import backend_choice, ops
from rep3d_nnunet.blocks import ModulatedDepthwiseConv

SHAPE = (2, 3, 8, 9, 10)  # a 7^3 kernel here: both backends are candidates on the CPU
KERNEL = (3, 1, 7, 7, 7)


@pytest.fixture(autouse=True)
def _no_decisions(monkeypatch):
    backend_choice.forget_decisions()
    monkeypatch.setenv(backend_choice.POLICY_VARIABLE, "measure")
    yield
    backend_choice.forget_decisions()


def _timed_runs(monkeypatch, seconds: dict[str, float]) -> list[str]:
    """Replaces the timing of a backend by ``seconds[backend]``; returns the backends timed."""
    runs = []

    def fake(call, backend, repeats=3, budget_seconds=0.5):
        runs.append(backend)
        return seconds[backend]

    monkeypatch.setattr("rep3d_nnunet.backend_measurement.time_backend", fake)
    return runs


def _backends_used(monkeypatch) -> list[str]:
    used = []
    convolve = ops.convolve
    monkeypatch.setattr(ops, "convolve", lambda backend, *a: used.append(backend) or convolve(backend, *a))
    return used


@pytest.mark.parametrize("faster", ["direct", "fft"])
def test_the_faster_backend_is_measured_kept_and_used(monkeypatch, capsys, faster):
    slower = "fft" if faster == "direct" else "direct"
    runs = _timed_runs(monkeypatch, {faster: 0.001, slower: 0.02})
    used = _backends_used(monkeypatch)
    x = torch.randn(*SHAPE, requires_grad=True)
    weight = torch.randn(*KERNEL, requires_grad=True)
    ops.depthwise_conv(x, weight).sum().backward()
    assert set(runs) == {"direct", "fft"} and used == [faster]
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and printed[0].startswith("rep3d_nnunet: 7x7x7 depthwise conv, 3 channels at 8x9x10")
    assert f"(cpu, float32): {faster} (measured forward+backward: direct " in printed[0]

    # the same shape again: training, eval without autograd, prediction under inference_mode, another batch size
    runs.clear()
    ops.depthwise_conv(x, weight).sum().backward()
    with torch.no_grad():
        ops.depthwise_conv(x, weight)
    with torch.inference_mode():
        ops.depthwise_conv(torch.randn(1, *SHAPE[1:]), weight.detach())
    assert runs == [] and used == [faster] * 4
    assert capsys.readouterr().out == ""  # printed once
    (key, decision), = backend_choice.decisions().items()
    assert decision.backend == faster and decision.source == "measured" and key.dtype == torch.float32


def test_a_shape_first_met_in_prediction_is_measured_as_training_would_use_it(monkeypatch):
    """Under inference_mode the measurement still times forward and backward: the decision is the training one."""
    runs = _timed_runs(monkeypatch, {"direct": 0.02, "fft": 0.001})
    used = _backends_used(monkeypatch)
    conv = ModulatedDepthwiseConv(3, 7, dim=3, modulation="lrbm").eval()
    with torch.inference_mode():
        predicted = conv(torch.randn(1, 3, 8, 9, 10))
    assert set(runs) == {"direct", "fft"} and "fft" in used
    conv.train()
    trained = conv(torch.randn(2, 3, 8, 9, 10))
    trained.sum().backward()
    assert used[-1] == "fft" and predicted.shape == (1, 3, 8, 9, 10)


@pytest.mark.parametrize("policy, expected", [("model", None), ("direct", "direct"), ("fft", "fft")])
def test_the_policy_variable_switches_measuring_off_or_forces_a_backend(monkeypatch, policy, expected):
    monkeypatch.setenv(backend_choice.POLICY_VARIABLE, policy)
    runs = _timed_runs(monkeypatch, {"direct": 0.0, "fft": 0.0})
    used = _backends_used(monkeypatch)
    ops.depthwise_conv(torch.randn(*SHAPE), torch.randn(*KERNEL))
    model = backend_choice.choose_backend(SHAPE, KERNEL[2:], "cpu")
    assert runs == [] and used == [expected or model]
    (decision,) = backend_choice.decisions().values()
    assert decision.source == ("model" if policy == "model" else "forced")


def test_an_unknown_policy_is_refused_naming_the_variable(monkeypatch):
    monkeypatch.setenv(backend_choice.POLICY_VARIABLE, "fastest")
    with pytest.raises(ValueError, match="REP3D_CONV_BACKEND='fastest' is not one of measure, model, direct, fft"):
        ops.depthwise_conv(torch.randn(*SHAPE), torch.randn(*KERNEL))


def test_small_kernels_stay_direct_without_measuring(monkeypatch):
    runs = _timed_runs(monkeypatch, {"direct": 0.0, "fft": 0.0})
    used = _backends_used(monkeypatch)
    ops.depthwise_conv(torch.randn(*SHAPE), torch.randn(3, 1, 3, 3, 3))
    assert runs == [] and used == ["direct"]


def test_the_cpu_measures_no_backend_the_model_calls_hopeless(monkeypatch):
    """A direct 21^3 forward and backward takes tens of seconds on a CPU: it is not even tried."""
    runs = _timed_runs(monkeypatch, {"direct": 0.0, "fft": 0.0})
    _backends_used(monkeypatch)
    ops.depthwise_conv(torch.randn(1, 8, 32, 32, 32), torch.randn(8, 1, 21, 21, 21))
    assert set(runs) == {"fft"}


def _graph_ops(function, *args) -> list[str]:
    """The call targets of the FX graph torch.compile traces for ``function(*args)``."""
    targets = []

    def backend(graph_module, example_inputs):
        targets.extend(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return graph_module.forward

    torch._dynamo.reset()
    torch.compile(function, backend=backend, fullgraph=True)(*args)
    torch._dynamo.reset()
    return targets


def test_compiled_graphs_use_the_decision_taken_before_compiling(monkeypatch):
    _timed_runs(monkeypatch, {"direct": 0.001, "fft": 0.02})
    x, weight = torch.randn(*SHAPE), torch.randn(*KERNEL)
    eager = ops.depthwise_conv(x, weight)  # measured: direct
    targets = _graph_ops(ops.depthwise_conv, x, weight)
    assert not any("fft_depthwise_conv" in t for t in targets) and any("conv3d" in t for t in targets)
    torch.testing.assert_close(torch.compile(ops.depthwise_conv, backend="eager")(x, weight), eager)


def test_a_shape_first_met_while_compiling_is_decided_by_the_model_and_eager_agrees(monkeypatch, capsys):
    runs = _timed_runs(monkeypatch, {"direct": 0.0, "fft": 0.0})
    x, weight = torch.randn(1, 4, 24, 24, 24), torch.randn(4, 1, 13, 13, 13)
    targets = _graph_ops(ops.depthwise_conv, x, weight)  # no measurement inside a trace
    (key, decision), = backend_choice.decisions().items()
    assert runs == [] and decision.source.startswith("model (first met while compiling")
    assert ("fft" if any("fft_depthwise_conv" in t for t in targets) else "direct") == decision.backend
    assert "first met while compiling, not measured" in capsys.readouterr().out
    used = _backends_used(monkeypatch)
    ops.depthwise_conv(x, weight)  # eager, same process: the same backend, still not measured
    assert runs == [] and used == [decision.backend]


def test_measuring_a_network_leaves_it_untouched_and_decides_training_and_prediction(monkeypatch):
    """Our trainers measure every decision of a training step and of a batch-1 eval forward (validation, prediction
    tiles: the LRBM mask's generator convolutions run in the eval path's dtype there) on a copy, before the first
    (compiled) step."""
    from rep3d_nnunet.backend_measurement import measure_network
    from tests.helpers import PLANS, build_network, plan_configuration

    runs = _timed_runs(monkeypatch, {"direct": 0.001, "fft": 0.002})
    configuration = plan_configuration(*PLANS["3d"])
    network = build_network("nnUNetTrainerRep3D", configuration)
    for module in network.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            raise AssertionError("the plan is expected to use instance norm")
    before = {k: v.clone() for k, v in network.state_dict().items()}
    measure_network(network, (2, 1, *configuration.patch_size), torch.device("cpu"))
    assert runs and backend_choice.decisions()
    assert all(torch.equal(before[k], v) for k, v in network.state_dict().items())
    assert all(p.grad is None for p in network.parameters())
    assert {d.source for d in backend_choice.decisions().values()} <= {"measured", "small kernel"}
    runs.clear()
    network(torch.randn(2, 1, *configuration.patch_size)).__getitem__(0).sum().backward()
    with torch.inference_mode():
        network.eval()(torch.randn(1, 1, *configuration.patch_size))
    assert runs == []  # everything the training step, validation and prediction need is decided


def test_a_network_is_measured_under_the_autocast_dtype_its_step_uses(monkeypatch):
    """bfloat16 users get measured bfloat16 decisions (the pre-measurement used to time float16 only)."""
    from rep3d_nnunet.backend_measurement import measure_network

    timed = []
    monkeypatch.setattr("rep3d_nnunet.backend_measurement.time_backend",
                        lambda call, backend, *a, **k: timed.append(call) or {"direct": 1e-3, "fft": 2e-3}[backend])
    conv = ModulatedDepthwiseConv(3, 7, dim=3, modulation="none")
    measure_network(conv, SHAPE, torch.device("cpu"), autocast_dtype=torch.bfloat16)
    assert timed and {(c.key.dtype, c.autocast_dtype) for c in timed} == {(torch.bfloat16, torch.bfloat16)}
    (key, decision), = backend_choice.decisions().items()
    assert key.dtype == torch.bfloat16 and decision.source == "measured"


def test_a_channels_last_input_is_decided_apart_from_a_contiguous_one():
    """On CUDA torch sends a channels-last depthwise conv to cuDNN and a contiguous one to its own kernel: one
    measurement cannot stand for both (real timings here, the CPU's)."""
    x, weight = torch.randn(*SHAPE), torch.randn(*KERNEL)
    ops.depthwise_conv(x, weight)
    ops.depthwise_conv(x.contiguous(memory_format=torch.channels_last_3d), weight)
    assert len(backend_choice.decisions()) == 2
    assert sorted(key.memory_format for key in backend_choice.decisions()) == ["channels_last", "contiguous"]
    assert all(decision.source == "measured" for decision in backend_choice.decisions().values())


def test_a_record_is_read_back_for_its_device_and_ignored_in_one_line_for_another(monkeypatch, capsys):
    runs = _timed_runs(monkeypatch, {"direct": 0.02, "fft": 0.001})
    x, weight = torch.randn(*SHAPE), torch.randn(*KERNEL)
    ops.depthwise_conv(x, weight)
    recorded = backend_choice.record()
    (device,) = recorded
    capsys.readouterr()
    # another device model: ignored, said in one line (once), and its shapes are decided here
    backend_choice.forget_decisions()
    backend_choice.adopt({"cuda: An Imaginary GPU": recorded[device]})
    backend_choice.adopt({"cuda: An Imaginary GPU": recorded[device]})
    assert backend_choice.decisions() == {}
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and "measured on cuda: An Imaginary GPU" in printed[0] and "ignored" in printed[0]
    # this device: read back, not measured again (the timings say direct now: a measurement would show)
    backend_choice.forget_decisions()
    runs = _timed_runs(monkeypatch, {"direct": 0.001, "fft": 0.02})
    used = _backends_used(monkeypatch)
    backend_choice.adopt(recorded)
    ops.depthwise_conv(x, weight)
    assert runs == [] and used == ["fft"]
    (decision,) = backend_choice.decisions().values()
    assert decision.recorded and decision.source == "measured"


def _tiny_trainer(tmp_path, monkeypatch):
    """nnUNetTrainerRep3D on a tiny plan, on the CPU, in a throwaway nnU-Net tree. There is no dataset: nnU-Net's
    on_train_start is reduced to its initialisation and what it saves in the model folder (plans.json, dataset.json);
    the rest needs data."""
    import json

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from rep3d_nnunet.nnunet_compat import find_trainer_class
    from tests.helpers import nnunet_environment, tiny_plans, use_nnunet_tree

    env = nnunet_environment(tmp_path)
    use_nnunet_tree(monkeypatch, env)
    plans = {**tiny_plans(3), "continue_training": False}  # nnU-Net's run_training passes this flag in the plans
    plans["configurations"]["3d_fullres"]["batch_dice"] = False
    dataset = {"channel_names": {"0": "MR"}, "labels": {"background": 0, "lesion": 1}, "numTraining": 2,
               "file_ending": ".nii.gz"}
    preprocessed = tmp_path / "nnUNet_preprocessed" / plans["dataset_name"] / "nnUNetPlans_3d_fullres"
    preprocessed.mkdir(parents=True, exist_ok=True)
    (preprocessed / "case.b2nd").write_bytes(b"")  # nnU-Net infers its dataset class from the file endings

    def save_model_folder_files(trainer):
        if not trainer.was_initialized:
            trainer.initialize()
        (Path(trainer.output_folder_base) / "plans.json").write_text(json.dumps(trainer.plans_manager.plans))
        (Path(trainer.output_folder_base) / "dataset.json").write_text(json.dumps(trainer.dataset_json))

    monkeypatch.setattr(nnUNetTrainer, "on_train_start", save_model_folder_files)
    return find_trainer_class("nnUNetTrainerRep3D")(plans, "3d_fullres", 0, dataset, torch.device("cpu"))


def test_a_trained_model_predicts_with_the_backends_its_training_measured(tmp_path, monkeypatch, capsys):
    """nnU-Net's predictor used to measure again in its own process (batch 1, eval-mode shapes, the float64 mask
    convolutions), so prediction could run other backends than training did. Real timings here (the CPU's)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    trainer = _tiny_trainer(tmp_path, monkeypatch)
    trainer.on_train_start()  # every decision of the run before nnU-Net saves the plans
    trainer.save_checkpoint(str(Path(trainer.output_folder) / "checkpoint_final.pth"))
    trained = {k: d.backend for k, d in backend_choice.decisions().items() if d.source == "measured"}
    assert trained
    capsys.readouterr()
    patch = trainer.configuration_manager.patch_size
    with torch.inference_mode():  # validation in the training process: nothing left to measure
        trainer.network.eval()(torch.randn(1, 1, *patch))
    assert "measured forward+backward" not in capsys.readouterr().out

    backend_choice.forget_decisions()  # nnUNetv2_predict: a fresh process
    predictor = nnUNetPredictor(tile_step_size=0.5, use_mirroring=True, perform_everything_on_device=False,
                                device=torch.device("cpu"), verbose=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(trainer.output_folder_base, (0,), "checkpoint_final.pth")
    predictor.predict_sliding_window_return_logits(torch.randn(1, *patch))
    printed = capsys.readouterr().out
    assert "measured forward+backward" not in printed
    used = {k: d.backend for k, d in backend_choice.decisions().items() if d.source == "measured"}
    assert used == trained and all(d.recorded for d in backend_choice.decisions().values()
                                   if d.source == "measured")

    backend_choice.forget_decisions()  # nnUNetv2_train --val: a fresh process loads the checkpoint, then validates
    validating = _tiny_trainer(tmp_path, monkeypatch)
    validating.load_checkpoint(str(Path(trainer.output_folder) / "checkpoint_final.pth"))
    validating.measure_conv_backends()  # what perform_actual_validation runs first
    assert "measured forward+backward" not in capsys.readouterr().out
    assert {k: d.backend for k, d in backend_choice.decisions().items() if d.source == "measured"} == trained


def _ddp_worker(rank: int, port: int, result_file: str) -> None:
    import rep3d_nnunet.backend_measurement as measurement

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       backend_choice.POLICY_VARIABLE: "measure"})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        # rank 0 alone would pick direct (1 ms vs 20 ms), rank 1 fft (40 ms vs 5 ms); the slowest rank's times
        # (direct 40 ms, fft 20 ms) decide for both, before training (the pre-measurement is the only place the
        # ranks exchange times)
        seconds = [{"direct": 0.001, "fft": 0.020}, {"direct": 0.040, "fft": 0.005}][rank]
        measurement.time_backend = lambda call, backend, *args, **kwargs: seconds[backend]
        measurement.measure_network(ModulatedDepthwiseConv(3, 7, dim=3, modulation="none"), SHAPE,
                                    torch.device("cpu"))
        (decision,) = backend_choice.decisions().values()
        torch.save(decision.backend, f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_every_ddp_rank_takes_the_same_decision(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result_file = str(tmp_path / "decision")
    mp.spawn(_ddp_worker, args=(port, result_file), nprocs=2, join=True)
    assert [torch.load(f"{result_file}.{rank}") for rank in range(2)] == ["fft", "fft"]


@pytest.mark.parametrize("policy", ["model", "measure"])
def test_training_and_prediction_compute_one_shape_with_one_backend(monkeypatch, policy):
    """The cost model used to weigh a forward alone in inference: a 7^3 kernel on [32, 32^3] took the FFT in training
    and torch's conv in prediction (under CUDA autocast: float32 maths against float16), so a trained model predicted
    with another function than it was trained with."""
    monkeypatch.setenv(backend_choice.POLICY_VARIABLE, policy)
    _timed_runs(monkeypatch, {"direct": 0.02, "fft": 0.001})
    used = _backends_used(monkeypatch)
    x, weight = torch.randn(1, 32, 32, 32, 32), torch.randn(32, 1, 7, 7, 7)
    ops.depthwise_conv(x.requires_grad_(), weight.requires_grad_()).sum().backward()
    with torch.inference_mode():
        ops.depthwise_conv(x.detach(), weight.detach())
    assert len(used) == 2 and used[0] == used[1] == "fft"


def test_an_export_carries_the_decisions_and_its_network_reads_them_back(tmp_path, monkeypatch):
    """nnU-Net's default trainer builds an exported network from the plans' arch_kwargs alone: the decisions travel
    there, and building the network adopts them."""
    import json

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from rep3d_nnunet.export import export_model_folder
    from rep3d_nnunet.nnunet_compat import build_network, record_build_inputs
    from tests.helpers import write_model_folder

    runs = _timed_runs(monkeypatch, {"direct": 0.02, "fft": 0.001})
    ops.depthwise_conv(torch.randn(*SHAPE), torch.randn(*KERNEL))
    recorded = backend_choice.record()
    folder = write_model_folder(tmp_path, "nnUNetTrainerRep3D")
    plans = json.loads((folder / "plans.json").read_text())
    record_build_inputs(plans, "3d_fullres", recorded)
    (folder / "plans.json").write_text(json.dumps(plans))
    monkeypatch.setenv(backend_choice.POLICY_VARIABLE, "model")  # the export's own check runs on the CPU's default
    export_model_folder(folder, tmp_path / "exported")
    exported = json.loads((tmp_path / "exported" / "plans.json").read_text())
    assert exported["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["conv_backend_decisions"] == recorded

    backend_choice.forget_decisions()  # nnUNetv2_predict of the export: a fresh process
    manager = PlansManager(exported)
    build_network(nnUNetTrainer, manager, manager.get_configuration("3d_fullres"), 1, 2, False)
    (key, decision), = backend_choice.decisions().items()
    assert decision.recorded and decision.backend == "fft" and runs == ["direct", "fft"]
