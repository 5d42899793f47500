import logging

import numpy as np
import pytest
import soundfile as sf
import torch
from fairseq import tasks
from omegaconf import OmegaConf

import fairseq_siamctc  # noqa: F401  (registers the task)
from fairseq_siamctc.data.paired_audio_dataset import BadAudioError
from fairseq_siamctc.errors import DataError, SetupError
from fairseq_siamctc.data.perturb import perturb
from fairseq_siamctc.tasks.siamctc import SiamCTCConfig

SR = 16000
PAPER_SPEEDS = [0.8, 0.9, 1.0, 1.1, 1.2]
PAPER_SEMITONES = [-2.0, -1.0, 0.0, 1.0, 2.0]


def write_corpus(root, lengths, split="train", rate=SR, seed=0):
    """Writes u{i}.wav of the given lengths and {split}.tsv; returns the waveforms as read back."""
    rng = np.random.default_rng(seed)
    lines, waves = [str(root)], []
    for i, n in enumerate(lengths):
        wav = (0.1 * rng.standard_normal(n)).astype(np.float32)
        sf.write(root / f"u{i}.wav", wav, rate, subtype="FLOAT")
        lines.append(f"u{i}.wav\t{n}")
        waves.append(wav)
    (root / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return waves


def make_task(data, **overrides):
    settings = dict(data=str(data), train_subset="train", seed=7, max_sample_size=24000, min_sample_size=8000)
    settings.update(overrides)
    cfg = OmegaConf.structured(SiamCTCConfig(**settings))
    cfg._name = "siamctc"
    return tasks.setup_task(cfg)


def load(task, split):
    task.load_dataset(split)
    return task.dataset(split)


def batches(task, split, epochs=(1,), num_workers=0, max_tokens=None, batch_size=4):
    dataset = task.dataset(split)
    itr = task.get_batch_iterator(
        dataset, max_tokens=max_tokens, max_sentences=batch_size, num_workers=num_workers,
        seed=3, epoch=epochs[0], disable_iterator_cache=True,
    )
    out = []
    for epoch in epochs:
        assert itr.next_epoch_idx == epoch
        out.extend((epoch, batch) for batch in itr.next_epoch_itr(shuffle=True))
    if num_workers:
        # fairseq's iterator holds its DataLoader in a reference cycle; left to the garbage collector,
        # each persistent worker takes 5 s to time out, so stop them here.
        itr.dataloader._iterator._shutdown_workers()
    return out


def on_grid(value, grid):
    """The grid value that a float32 factor stands for."""
    nearest = min(grid, key=lambda g: abs(g - value))
    assert value == pytest.approx(nearest, abs=1e-6)
    return nearest


def views_by_id(epoch_batches):
    views = {}
    for epoch, batch in epoch_batches:
        net = batch["net_input"]
        for row, index in enumerate(batch["id"].tolist()):
            views[epoch, index] = (
                net["source"][row][~net["padding_mask"][row]].numpy(),
                net["source_pert"][row][~net["padding_mask_pert"][row]].numpy(),
                float(batch["speed"][row]),
                float(batch["semitones"][row]),
            )
    return views


def test_registered_with_the_paper_view_settings():
    cfg = SiamCTCConfig()
    assert "siamctc" in tasks.TASK_REGISTRY
    assert list(cfg.speeds) == PAPER_SPEEDS and list(cfg.semitones) == PAPER_SEMITONES
    assert cfg.perturb_mode == "speed" and cfg.speed_probs is None and cfg.semitone_probs is None


def test_batch_shapes_masks_and_views(tmp_path):
    lengths = [16000, 20000, 30000, 12000, 9000]
    waves = write_corpus(tmp_path, lengths, split="valid")
    task = make_task(tmp_path)
    load(task, "valid")
    seen = set()
    for _, batch in batches(task, "valid", batch_size=3):
        net = batch["net_input"]
        assert set(net) == {"source", "padding_mask", "source_pert", "padding_mask_pert"}
        assert net["padding_mask"].dtype == torch.bool and net["source"].dtype == torch.float32
        bsz = len(batch["id"])
        assert net["source"].shape[0] == net["source_pert"].shape[0] == bsz
        assert batch["speed"].shape == batch["semitones"].shape == (bsz,)
        for row, index in enumerate(batch["id"].tolist()):
            seen.add(index)
            n = min(lengths[index], 24000)
            start = (lengths[index] - n) // 2  # validation crops the centre
            mask = net["padding_mask"][row]
            assert int((~mask).sum()) == n and not mask[:n].any()
            np.testing.assert_array_equal(net["source"][row, :n].numpy(), waves[index][start : start + n])
            assert not net["source"][row, n:].any()
            speed = on_grid(float(batch["speed"][row]), PAPER_SPEEDS)
            semitones = on_grid(float(batch["semitones"][row]), PAPER_SEMITONES)
            n_pert = round(n / speed)
            mask_pert = net["padding_mask_pert"][row]
            assert int((~mask_pert).sum()) == n_pert and not mask_pert[:n_pert].any()
            expected = perturb(waves[index][start : start + n], SR, speed=speed, semitones=semitones)
            np.testing.assert_allclose(net["source_pert"][row, :n_pert].numpy(), expected, atol=1e-6)
            assert not net["source_pert"][row, n_pert:].any()
    assert seen == set(range(len(lengths)))


def test_training_crops_are_random_segments_of_the_file(tmp_path):
    waves = write_corpus(tmp_path, [40000])
    task = make_task(tmp_path, max_sample_size=16000)
    load(task, "train")
    starts = set()
    for (_, index), (source, *_rest) in views_by_id(batches(task, "train", epochs=(1, 2, 3, 4))).items():
        assert len(source) == 16000
        matches = [s for s in range(40000 - 16000 + 1) if waves[index][s] == source[0]]
        assert any(np.array_equal(waves[index][s : s + 16000], source) for s in matches)
        starts.add(matches[0])
    assert len(starts) > 1


def test_same_views_with_0_and_2_workers_across_epochs_and_after_resume(tmp_path):
    write_corpus(tmp_path, [12000, 16000, 20000, 14000, 18000, 10000])
    task = make_task(tmp_path)
    load(task, "train")
    in_process = views_by_id(batches(task, "train", epochs=(1, 2)))
    in_workers = views_by_id(batches(task, "train", epochs=(1, 2), num_workers=2))
    assert in_process.keys() == in_workers.keys() and len(in_process) == 12
    for key, (source, pert, speed, semitones) in in_process.items():
        other = in_workers[key]
        np.testing.assert_array_equal(source, other[0])
        np.testing.assert_array_equal(pert, other[1])
        assert (speed, semitones) == other[2:]
    # Views are redrawn every epoch ...
    assert any(in_process[1, i][2:] != in_process[2, i][2:] for i in range(6))
    # ... and a run resumed at epoch 2, in a fresh task, sees epoch 2's views.
    resumed_task = make_task(tmp_path)
    load(resumed_task, "train")
    resumed = views_by_id(batches(resumed_task, "train", epochs=(2,), num_workers=2))
    for (epoch, index), (_, pert, speed, semitones) in resumed.items():
        np.testing.assert_array_equal(pert, in_process[epoch, index][1])
        assert (speed, semitones) == in_process[epoch, index][2:]


def test_validation_views_stay_the_same_every_epoch(tmp_path):
    write_corpus(tmp_path, [12000, 16000, 30000], split="valid")
    task = make_task(tmp_path)
    load(task, "valid")
    views = views_by_id(batches(task, "valid", epochs=(1, 2)))
    for index in range(3):
        np.testing.assert_array_equal(views[1, index][1], views[2, index][1])
        assert views[1, index][2:] == views[2, index][2:]


def test_view_probabilities_and_tempo_mode(tmp_path):
    write_corpus(tmp_path, [12000, 16000, 20000])
    task = make_task(tmp_path, speed_probs=[0, 0, 0, 0, 1], semitone_probs=[1, 0, 0, 0, 0], perturb_mode="tempo")
    load(task, "train")
    (_, batch), = batches(task, "train")
    assert batch["speed"].tolist() == pytest.approx([1.2] * 3) and batch["semitones"].tolist() == [-2.0] * 3
    lengths = (~batch["net_input"]["padding_mask"]).sum(1)
    assert (~batch["net_input"]["padding_mask_pert"]).sum(1).tolist() == [round(int(n) / 1.2) for n in lengths]


def test_bad_view_settings_are_errors(tmp_path):
    write_corpus(tmp_path, [12000])
    with pytest.raises(SetupError, match="speeds probabilities"):
        load(make_task(tmp_path, speed_probs=[0.5, 0.5]), "train")
    with pytest.raises(SetupError, match="positive"):
        load(make_task(tmp_path, speeds=[1.0, -1.0]), "train")


def test_batching_by_max_tokens_and_batch_size(tmp_path):
    lengths = [9000, 30000, 12000, 20000, 16000, 24000, 11000, 15000, 18000, 10000]
    write_corpus(tmp_path, lengths)
    task = make_task(tmp_path)
    dataset = load(task, "train")
    assert dataset.sizes.tolist() == [min(n, 24000) for n in lengths]
    for max_tokens, batch_size in [(50000, None), (None, 3), (60000, 2)]:
        ids = []
        for _, batch in batches(task, "train", max_tokens=max_tokens, batch_size=batch_size):
            bsz, width = batch["net_input"]["source"].shape
            if max_tokens:
                assert bsz * width <= max_tokens
            if batch_size:
                assert bsz <= batch_size
            ids.extend(batch["id"].tolist())
        assert sorted(ids) == list(range(len(lengths)))


def test_min_sample_size_skips_are_counted_in_the_log(tmp_path, caplog):
    write_corpus(tmp_path, [12000, 7999, 8000, 0, 3000])
    with caplog.at_level(logging.INFO):
        dataset = load(make_task(tmp_path), "train")
    assert len(dataset) == 2 and sorted(dataset.sizes.tolist()) == [8000, 12000]
    assert "skipped 3 of 5 utterances shorter than min_sample_size=8000" in caplog.text


def test_normalize_gives_zero_mean_unit_variance_views(tmp_path):
    write_corpus(tmp_path, [12000, 16000])
    task = make_task(tmp_path, normalize=True)
    load(task, "train")
    for source, pert, *_ in views_by_id(batches(task, "train")).values():
        for wav in (source, pert):
            assert abs(wav.mean()) < 1e-4 and wav.std() == pytest.approx(1.0, abs=1e-3)


def test_other_sample_rate_is_an_error_unless_resample(tmp_path):
    t = np.arange(12000) / 8000
    sf.write(tmp_path / "low.wav", (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 8000, subtype="FLOAT")
    (tmp_path / "train.tsv").write_text(f"{tmp_path}\nlow.wav\t12000\n")
    dataset = load(make_task(tmp_path), "train")
    with pytest.raises(BadAudioError, match=r"low\.wav.*train\.tsv:2.*8000 Hz"):
        dataset[0]
    dataset = load(make_task(tmp_path, resample=True), "train")
    assert dataset.sizes.tolist() == [24000]
    source = dataset[0]["source"].numpy()
    assert len(source) == 24000
    spectrum = np.abs(np.fft.rfft(source * np.hanning(len(source))))
    assert np.argmax(spectrum) * SR / len(source) == pytest.approx(440, abs=1)


def test_missing_or_malformed_manifest_is_an_error_naming_the_line(tmp_path):
    with pytest.raises(SetupError, match="train.tsv"):
        load(make_task(tmp_path), "train")
    write_corpus(tmp_path, [12000, 12000])
    (tmp_path / "train.tsv").write_text(f"{tmp_path}\nu0.wav\t12000\nu1.wav 12000\n")
    with pytest.raises(SetupError, match=r"train\.tsv:3.*u1\.wav 12000"):
        load(make_task(tmp_path), "train")
    (tmp_path / "train.tsv").write_text(f"{tmp_path}\nu0.wav\ttwelve\n")
    with pytest.raises(SetupError, match=r"train\.tsv:2"):
        load(make_task(tmp_path), "train")
    (tmp_path / "train.tsv").write_text("")
    with pytest.raises(SetupError, match=r"train\.tsv:1.*root"):
        load(make_task(tmp_path), "train")


def test_missing_audio_file_is_an_error_naming_file_and_line(tmp_path):
    write_corpus(tmp_path, [12000, 12000])
    (tmp_path / "u1.wav").unlink()
    with pytest.raises(SetupError, match=r"1 audio file.*u1\.wav \(.*train\.tsv:3\)"):
        load(make_task(tmp_path), "train")


def test_stereo_audio_is_an_error_naming_file_and_line(tmp_path):
    write_corpus(tmp_path, [12000, 12000])
    sf.write(tmp_path / "u1.wav", np.zeros((12000, 2), dtype=np.float32), SR)
    dataset = load(make_task(tmp_path), "train")
    with pytest.raises(BadAudioError, match=r"u1\.wav.*train\.tsv:3.*2 channels"):
        dataset[dataset.files.index("u1.wav")]


@pytest.mark.parametrize("damage", ["length_mismatch", "empty_file", "corrupt"])
def test_damaged_file_is_skipped_with_a_count(tmp_path, caplog, damage):
    write_corpus(tmp_path, [12000, 12000, 12000])
    if damage == "length_mismatch":
        sf.write(tmp_path / "u1.wav", np.zeros(11000, dtype=np.float32), SR)
    elif damage == "empty_file":
        sf.write(tmp_path / "u1.wav", np.zeros(0, dtype=np.float32), SR)
    else:
        (tmp_path / "u1.wav").write_bytes(b"not audio at all" * 100)
    dataset = load(make_task(tmp_path, max_unreadable_share=0.5), "train")
    with caplog.at_level(logging.WARNING):
        batch = dataset.collater([dataset[i] for i in range(3)])
    assert batch["id"].tolist() == [0, 2] and batch["net_input"]["source"].shape == (2, 12000)
    assert "skipping" in caplog.text and "u1.wav" in caplog.text and "train.tsv:3" in caplog.text
    assert "1 skipped so far" in caplog.text
    # a batch with nothing readable is an error, never fairseq's zero-loss placeholder batch
    with pytest.raises(DataError, match=r"every file of a batch.*u1\.wav \(.*train\.tsv:3\)"):
        dataset.collater([dataset[1]])


def test_unreadable_files_above_the_limit_stop_with_their_names(tmp_path):
    write_corpus(tmp_path, [12000] * 10)
    for i in (3, 6):  # what a clone without git-lfs holds: pointer text files
        (tmp_path / f"u{i}.wav").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    dataset = load(make_task(tmp_path, max_unreadable_share=0.1), "train")  # 1 of 10 may be skipped
    assert dataset[3]["source"] is None
    with pytest.raises(DataError, match=r"2 of the 10 files.*max_unreadable_share=0\.1.*u6\.wav.*also .*u3\.wav"):
        dataset[6]
    # the default limit is 1 %: the first unreadable file of these 10 stops
    with pytest.raises(DataError, match=r"1 of the 10 files.*u3\.wav \(.*train\.tsv:5\)"):
        load(make_task(tmp_path), "train")[3]


def test_the_unreadable_count_is_shared_by_loader_workers(tmp_path):
    write_corpus(tmp_path, [12000] * 8)
    task = make_task(tmp_path, max_unreadable_share=0.2)  # 1 of 8 may be skipped, 2 may not
    dataset = load(task, "train")
    order = dataset.ordered_indices()
    for i in (order[0], order[4]):  # one in each batch of 4, so one in each worker's batch
        (tmp_path / dataset.files[i]).write_bytes(b"not audio at all" * 100)
    with pytest.raises(DataError, match="2 of the 8 files"):
        batches(task, "train", num_workers=2, batch_size=4)


class StridedConvEncoder(torch.nn.Module):
    """Stand-in for the SiamCTC model: a 400-sample, 320-stride conv gives 50 frames a second."""

    def __init__(self, dim=16):
        super().__init__()
        self.conv = torch.nn.Conv1d(1, dim, kernel_size=400, stride=320)
        self.phi = torch.nn.Linear(dim, dim)
        self.psi = torch.nn.Linear(dim, dim)

    def encode(self, source, padding_mask):
        z = self.conv(source[:, None, :]).transpose(1, 2)
        frames = torch.div((~padding_mask).sum(1) - 400, 320, rounding_mode="floor") + 1
        return z, torch.arange(z.shape[1])[None, :] >= frames[:, None]

    def forward(self, source, padding_mask, source_pert, padding_mask_pert):
        z, z_padding_mask = self.encode(source, padding_mask)
        z_pert, z_pert_padding_mask = self.encode(source_pert, padding_mask_pert)
        return {"z": z, "z_pert": z_pert, "z_padding_mask": z_padding_mask, "z_pert_padding_mask": z_pert_padding_mask}


def test_a_batch_runs_through_the_criterion_as_its_utterances_one_by_one(tmp_path):
    """Padding of either view changes nothing: the batch loss is the sum of single-utterance losses."""
    from fairseq_siamctc.criterions.siamctc import SiamCTCCriterion, SiamCTCCriterionConfig

    write_corpus(tmp_path, [12000, 16000, 20000, 9000])
    task = make_task(tmp_path)
    dataset = load(task, "train")
    torch.manual_seed(0)
    model = StridedConvEncoder()
    # beta=0: TINCE's random negatives depend on the batch, the CTC and KL terms must not.
    criterion = SiamCTCCriterion.build_criterion(SiamCTCCriterionConfig(seed=1, beta=0.0), task)
    items = [dataset[i] for i in range(len(dataset))]
    batch = dataset.collater(items)
    assert batch["net_input"]["padding_mask"].any() and batch["net_input"]["padding_mask_pert"].any()
    loss, sample_size, logging_output = criterion(model, batch)
    assert sample_size == 4 and logging_output["nsentences"] == 4 and torch.isfinite(loss)
    singles = sum(criterion(model, dataset.collater([item]))[0] for item in items)
    assert loss.item() == pytest.approx(singles.item(), rel=1e-4)
    loss.backward()
    assert model.conv.weight.grad.abs().sum() > 0 and model.phi.weight.grad.abs().sum() > 0


def test_run_folder_check_compares_the_model_settings_both_runs_have():
    from fairseq_siamctc.tasks.siamctc import model_config_differences

    saved = {"_name": "siamctc", "encoder_path": "/a/hubert.pt", "feature_layer": None, "checkpoint_activations": False}
    assert model_config_differences(saved, dict(saved)) == []
    # a setting added to the plugin since, or one that changes only how a step is computed, is no difference
    assert model_config_differences(saved, {**saved, "new_setting": 1, "checkpoint_activations": True}) == []
    assert model_config_differences(saved, {**saved, "feature_layer": 9, "encoder_path": "/b/hubert.pt"}) == [
        "model.encoder_path: '/a/hubert.pt' -> '/b/hubert.pt'", "model.feature_layer: None -> 9"]
