"""TFDS builders `era5` / `hres`, built in tmp_path from the real samples in tests/data.

Every dataset here is written with ``download_and_prepare()`` and read back with
``as_data_source()`` only, with TensorFlow absent; values are compared with what
`readers.open_dataset` gives for the same files, statistics with numpy.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_builders.builders import Era5, Hres, WeatherBuilder, global_grid, make_config
from data_builders.readers import DataError, open_dataset, regrid
from data_builders.stats import RunningStats, stat_key

tfds.disable_progress_bar()

DATA = Path(__file__).parent / "data"
HRES_PL = DATA / "hres_pl_20240603T00-20240604T18_6h_10deg.nc"
NATL = DATA / "hres_an_sfc_pl_20160925-20161001_12h_10deg_natlantic.nc"
STATIC = DATA / "era5_static_z_lsm_0.25deg.nc"
WB1 = DATA / "weatherbench1_era5_static_5.625deg.nc"

HRES_KW = dict(
    paths=[HRES_PL],
    static_paths=[STATIC],
    surf_vars=(),
    atmos_vars=("z", "t", "u", "v", "r"),
    static_vars=("lsm", "z"),
    levels=(300, 500, 850),
)
NATL_KW = dict(
    paths=[NATL],
    static_paths=[STATIC],
    surf_vars=("10u", "10v", "msl"),
    atmos_vars=("t", "u", "v", "w"),
    static_vars=("lsm", "z"),
    levels=None,
    splits={
        "train": ("2016-09-25", "2016-09-28T12"),
        "validation": ("2016-09-29", "2016-09-30"),
        "test": ("2016-09-30T12", None),
    },
    chunk_hours=36,
)


def seconds(times: np.ndarray) -> list[int]:
    return times.astype("datetime64[s]").astype(np.int64).tolist()


def read_all(builder: WeatherBuilder, split: str) -> list[dict]:
    src = builder.as_data_source(split)
    return [src[i] for i in range(len(src))]


def test_tensorflow_is_absent() -> None:
    # The builders must work without TensorFlow; nothing in them may import it.
    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("TensorFlow is installed here; the no-TensorFlow check cannot run")
    assert "tensorflow" not in sys.modules


def test_hres_values_equal_reader(tmp_path: Path) -> None:
    builder = Hres(data_dir=tmp_path, **HRES_KW)
    builder.download_and_prepare()
    ref = open_dataset(HRES_PL, variables=["z", "t", "u", "v", "r"], levels=[300, 500, 850])
    examples = read_all(builder, "train")
    # records are shuffled at write time; the stored index says which time each one holds
    assert [int(e["time"]) for e in examples] == builder.times("train").tolist()
    assert sorted(builder.times("train").tolist()) == seconds(ref["time"].values)
    assert builder.times("train").tolist() != seconds(ref["time"].values)
    for example in examples:
        i = seconds(ref["time"].values).index(int(example["time"]))
        assert set(example) == {"time", "atmos"}  # no surface variables configured
        for v in ("z", "t", "u", "v", "r"):
            x = example["atmos"][v]
            assert x.dtype == np.float32 and x.shape == (3, 19, 36)
            np.testing.assert_array_equal(x, ref[v].values[i])
    lat, lon, levels = builder.grid()
    np.testing.assert_array_equal(lat, ref["latitude"].values)
    np.testing.assert_array_equal(lon, ref["longitude"].values)
    assert levels == (300.0, 500.0, 850.0)
    assert builder.info.metadata["loss_weight"] == 1.0
    assert "tensorflow" not in sys.modules


def test_hres_stats_match_numpy(tmp_path: Path) -> None:
    builder = Hres(data_dir=tmp_path, **HRES_KW)
    builder.download_and_prepare()
    ref = open_dataset(HRES_PL, variables=["z", "r"], levels=[300, 500, 850])
    stats = builder.stats()
    for v in ("z", "r"):
        for j, level in enumerate((300, 500, 850)):
            x = ref[v].values[:, j].astype(np.float64)
            mean, std = stats[f"{v}_{level}"]
            np.testing.assert_allclose([mean, std], [x.mean(), x.std()], rtol=1e-10)
    static = builder.static()
    for name in ("lsm", "z"):
        np.testing.assert_allclose(
            stats[name],
            [static[name].mean(dtype=np.float64), static[name].std(dtype=np.float64)],
            rtol=1e-10,
        )


def test_era5_splits_surface_static_and_stats(tmp_path: Path) -> None:
    builder = Era5(data_dir=tmp_path, **NATL_KW)
    builder.download_and_prepare()
    ref = open_dataset(NATL)
    all_times = seconds(ref["time"].values)
    got = {s: sorted(builder.times(s).tolist()) for s in ("train", "validation", "test")}
    assert got["train"] == all_times[:8]  # 25th 00 UTC .. 28th 12 UTC, 12-hourly
    assert got["validation"] == all_times[8:11]
    assert got["test"] == all_times[11:]
    for split, _times in got.items():
        for example in read_all(builder, split):
            i = all_times.index(int(example["time"]))
            for v in ("10u", "10v", "msl"):
                np.testing.assert_array_equal(example["surf"][v], ref[v].values[i])
            for v in ("t", "u", "v", "w"):
                np.testing.assert_array_equal(example["atmos"][v], ref[v].values[i])
    # statistics over the train split only, per level for atmospheric variables
    stats = builder.stats()
    train = ref.isel(time=slice(0, 8))
    np.testing.assert_allclose(
        stats["msl"],
        [train["msl"].values.mean(dtype=np.float64), train["msl"].values.std(dtype=np.float64)],
        rtol=1e-10,
    )
    w500 = train["w"].sel(level=500).values.astype(np.float64)
    np.testing.assert_allclose(stats["w_500"], [w500.mean(), w500.std()], rtol=1e-10)
    assert set(stats) >= {"10u", "10v", "msl", "t_500", "t_850", "w_850", "lsm", "z"}
    # static companion: the 0.25 degree file regridded onto the regional 10 degree grid
    lat, lon, _ = builder.grid()
    want = regrid(open_dataset(STATIC), lat, lon)
    np.testing.assert_array_equal(builder.static()["z"], want["z_sfc"].values)
    np.testing.assert_array_equal(builder.static()["lsm"], want["lsm"].values)
    assert builder.info.metadata["loss_weight"] == 2.0
    files = {p.name for p in Path(builder.data_dir).iterdir()}
    assert {"metadata.json", "static.npz", "dataset_info.json"} <= files


def test_resolution_regrids_and_fixes_shapes(tmp_path: Path) -> None:
    kw = {**HRES_KW, "resolution": 20, "static_paths": [WB1], "static_vars": ("lsm", "slt", "z")}
    builder = Hres(data_dir=tmp_path, **kw)
    builder.download_and_prepare()
    fields = {(g, n): shape for g, n, shape, _ in builder.info.metadata["record_layout"]["fields"]}
    assert fields[("atmos", "z")] == [3, 10, 18]
    lat, lon = global_grid(20)
    ref = regrid(open_dataset(HRES_PL, variables=["z"], levels=[300, 500, 850]), lat, lon)
    example = builder.as_data_source("train")[2]
    i = seconds(ref["time"].values).index(int(example["time"]))
    np.testing.assert_array_equal(example["atmos"]["z"], ref["z"].values[i])
    static = builder.static()
    assert set(static) == {"lsm", "slt", "z"} and static["slt"].shape == (10, 18)
    np.testing.assert_array_equal(static["z"], regrid(open_dataset(WB1), lat, lon)["z_sfc"].values)


def test_reopen_uses_stored_dataset_and_metadata(tmp_path: Path, monkeypatch) -> None:
    first = Hres(data_dir=tmp_path, **HRES_KW)
    first.download_and_prepare()

    def no_reading(*_a, **_k):
        raise AssertionError("a built dataset must not be regenerated")

    monkeypatch.setattr(Hres, "_read_dynamic", no_reading)
    again = Hres(data_dir=tmp_path, **HRES_KW)
    again.download_and_prepare()  # already there: nothing is read
    assert again.stats() == first.stats()
    np.testing.assert_array_equal(again.static()["lsm"], first.static()["lsm"])
    assert again.times("train").tolist() == first.times("train").tolist()
    stored = json.loads((Path(again.data_dir) / "metadata.json").read_text())
    assert stored["config"]["atmos_vars"] == ["z", "t", "u", "v", "r"]


def test_config_names_folders_and_refuses_stale_reuse(tmp_path: Path) -> None:
    a, b = (
        Hres(data_dir=tmp_path, **HRES_KW),
        Hres(data_dir=tmp_path, **{**HRES_KW, "levels": [500]}),
    )
    assert a.builder_config.name != b.builder_config.name  # content hash: separate folders
    named = Hres(data_dir=tmp_path, name="mine", **HRES_KW)
    named.download_and_prepare()
    with pytest.raises(DataError, match="different config.*levels"):
        Hres(data_dir=tmp_path, name="mine", **{**HRES_KW, "levels": [500]})


def test_chunked_build_equals_one_read(tmp_path: Path) -> None:
    whole = Hres(
        data_dir=tmp_path,
        **{**HRES_KW, "splits": {"train": ("2024-06-03", "2024-06-05")}, "chunk_hours": 1000},
    )
    chunked = Hres(
        data_dir=tmp_path,
        **{**HRES_KW, "splits": {"train": ("2024-06-03", "2024-06-05")}, "chunk_hours": 5},
    )
    for b in (whole, chunked):
        b.download_and_prepare()
    x, y = read_all(whole, "train"), read_all(chunked, "train")
    assert [int(e["time"]) for e in x] == [int(e["time"]) for e in y] and len(x) == 8
    for ex, ey in zip(x, y):  # same keys and split, so the same shuffled order
        np.testing.assert_array_equal(ex["atmos"]["t"], ey["atmos"]["t"])
    assert whole.stats() == chunked.stats()


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="overlaps"):
        make_config(
            paths=[HRES_PL],
            splits={"train": ("2024-06-03", "2024-06-04"), "test": ("2024-06-04", None)},
        )
    with pytest.raises(DataError, match="static_vars"):
        make_config(paths=[HRES_PL], static_vars=("orography",))
    with pytest.raises(DataError, match="stats_split 'train' is not a split"):
        make_config(paths=[HRES_PL], splits={"fit": (None, None)})
    with pytest.raises(DataError, match="no source paths"):
        make_config()
    with pytest.raises(TypeError, match="unknown builder option"):
        make_config(paths=[HRES_PL], variables=("z",))
    missing = Hres(data_dir=tmp_path, **{**HRES_KW, "atmos_vars": ("z", "q")})
    with pytest.raises(DataError, match=r"hres_pl.*missing variable.*'q'"):
        missing.download_and_prepare()
    empty = Hres(
        data_dir=tmp_path, **{**HRES_KW, "splits": {"train": ("2030-01-01", "2030-01-02")}}
    )
    with pytest.raises(DataError, match="no valid times in split train"):
        empty.download_and_prepare()


def test_running_stats_merge_equals_numpy() -> None:
    rng = np.random.default_rng(0)
    fields = [rng.normal(5e4, 3e3, size=(7, 9)).astype(np.float32) for _ in range(5)]
    acc = RunningStats()
    for f in fields:
        acc.add_field("z_500", f)
    x = np.stack(fields).astype(np.float64)
    np.testing.assert_allclose(acc.result()["z_500"], [x.mean(), x.std()], rtol=1e-12)
    assert stat_key("z", 7.5) == "z_7_5" and stat_key("2t") == "2t"


def test_build_spilling_to_disk_needs_no_tensorflow(tmp_path: Path, monkeypatch) -> None:
    # TFDS spills to bucket files past 1 GB (through tf.io.gfile); force it for every record.
    from tensorflow_datasets.core import shuffle

    monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 0)
    builder = Hres(data_dir=tmp_path, **HRES_KW)
    builder.download_and_prepare()
    ref = open_dataset(HRES_PL, variables=["t"], levels=[300, 500, 850])
    examples = read_all(builder, "train")
    assert [int(e["time"]) for e in examples] == builder.times("train").tolist()
    for example in examples:
        i = seconds(ref["time"].values).index(int(example["time"]))
        np.testing.assert_array_equal(example["atmos"]["t"], ref["t"].values[i])
    assert not list(Path(builder.data_dir).glob("**/bucket_*"))  # spill files cleaned up
    assert "tensorflow" not in sys.modules


def test_wrong_predicted_order_is_detected_and_rescanned(tmp_path: Path, monkeypatch) -> None:
    import data_builders.builders as builders

    monkeypatch.setattr(builders, "record_order", lambda split, times: sorted(times))
    builder = Hres(data_dir=tmp_path, **HRES_KW)
    builder.download_and_prepare()
    assert [int(e["time"]) for e in read_all(builder, "train")] == builder.times("train").tolist()
    reopened = Hres(data_dir=tmp_path, **HRES_KW)  # the rescanned index was saved
    assert reopened.times("train").tolist() == builder.times("train").tolist()


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
def test_codecs_store_the_same_records(tmp_path: Path, codec: str) -> None:
    pytest.importorskip({"zstd": "zstandard", "lz4": "lz4"}[codec])
    plain = Hres(data_dir=tmp_path / "none", **NATL_KW)
    packed = Hres(data_dir=tmp_path / codec, codec=codec, **NATL_KW)
    assert plain.builder_config.name != packed.builder_config.name  # the codec is in the hash
    for b in (plain, packed):
        b.download_and_prepare()
    assert packed.info.metadata["record_layout"]["codec"] == codec
    for a, b in zip(read_all(plain, "train"), read_all(packed, "train"), strict=True):
        assert int(a["time"]) == int(b["time"])
        for group in ("surf", "atmos"):
            assert a[group].keys() == b[group].keys()
            for v in a[group]:
                np.testing.assert_array_equal(a[group][v], b[group][v])
                assert b[group][v].dtype == np.float32


def test_records_are_raw_views_in_layout_order(tmp_path: Path) -> None:
    builder = Hres(data_dir=tmp_path, **NATL_KW)
    builder.download_and_prepare()
    layout = builder.info.metadata["record_layout"]
    assert [f[:2] for f in layout["fields"]] == [
        ["surf", "10u"], ["surf", "10v"], ["surf", "msl"],
        ["atmos", "t"], ["atmos", "u"], ["atmos", "v"], ["atmos", "w"],
    ]  # fmt: skip
    example = builder.as_data_source("validation")[0]
    x = example["atmos"]["u"]
    assert not x.flags.writeable and x.base is not None  # a view of the record, not a copy
    ref = builder.as_data_source("validation").reference(0)  # where the blob is stored
    assert ref["time"] == int(example["time"]) and ref["nbytes"] == layout["nbytes"]
    with open(builder.blob_root() / ref["file"], "rb") as f:
        f.seek(ref["offset"])
        raw = f.read(ref["nbytes"])
    offset = {(g, n): off for g, n, _, off in layout["fields"]}[("atmos", "u")]
    assert raw[: x[0].nbytes] == example["surf"]["10u"].astype("<f4").tobytes()
    assert raw[offset : offset + x.nbytes] == x.astype("<f4").tobytes()


def test_refuses_other_record_format(tmp_path: Path) -> None:
    builder = Hres(data_dir=tmp_path, **HRES_KW)
    builder.download_and_prepare()
    meta_path = Path(builder.data_dir) / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = 1
    del meta["record_layout"]
    meta_path.write_text(json.dumps(meta))
    again = Hres(data_dir=tmp_path, **HRES_KW)
    with pytest.raises(DataError, match="record format 1.*rebuild"):
        again.as_data_source("train")


def test_missing_codec_package_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import zstandard -> ImportError
    with pytest.raises(DataError, match="pip install zstandard"):
        make_config(paths=[HRES_PL], codec="zstd")
    with pytest.raises(DataError, match="codec 'gzip' unknown"):
        make_config(paths=[HRES_PL], codec="gzip")


def count_reads(monkeypatch) -> list[str]:
    """Record the start of every time chunk the builders read from their sources."""
    reads: list[str] = []
    original = WeatherBuilder._read_dynamic

    def counting(self, time: slice):
        reads.append(str(time.start)[:13])
        return original(self, time)

    monkeypatch.setattr(WeatherBuilder, "_read_dynamic", counting)
    return reads


def test_extending_the_time_range_reads_only_the_new_chunks(tmp_path: Path, monkeypatch) -> None:
    reads = count_reads(monkeypatch)
    kw = {**HRES_KW, "chunk_hours": 12}
    first = Hres(data_dir=tmp_path, **kw, splits={"train": ("2024-06-03", "2024-06-03T18")})
    first.download_and_prepare()
    assert reads == ["2024-06-03T00", "2024-06-03T12"]
    longer = Hres(
        data_dir=tmp_path,
        **kw,
        splits={"train": ("2024-06-03", "2024-06-04T06"), "validation": ("2024-06-04T12", None)},
    )
    assert longer.data_dir != first.data_dir  # another TFDS folder: splits are in its name
    assert longer.blob_root() == first.blob_root()  # the same stored fields
    longer.download_and_prepare()
    assert reads[2:] == ["2024-06-04T00", "2024-06-04T12"]  # only the new day is read
    ref = open_dataset(HRES_PL, variables=["z", "t", "u", "v", "r"], levels=[300, 500, 850])
    all_times = seconds(ref["time"].values)
    assert sorted(longer.times("train").tolist()) == all_times[:6]
    assert sorted(longer.times("validation").tolist()) == all_times[6:]
    for split in ("train", "validation"):
        for example in read_all(longer, split):
            i = all_times.index(int(example["time"]))
            np.testing.assert_array_equal(example["atmos"]["t"], ref["t"].values[i])
    # statistics are pooled over the train split only, although chunk 2024-06-04T00 is shared
    z = ref["z"].sel(level=500).values[:6].astype(np.float64)
    np.testing.assert_allclose(longer.stats()["z_500"], [z.mean(), z.std()], rtol=1e-10)


def test_a_changed_source_file_rebuilds_its_chunks(tmp_path: Path, monkeypatch) -> None:
    import os
    import shutil

    source = tmp_path / HRES_PL.name
    shutil.copy(HRES_PL, source)
    kw = {**HRES_KW, "paths": [source], "chunk_hours": 24}
    Hres(data_dir=tmp_path / "a", **kw).download_and_prepare()
    reads = count_reads(monkeypatch)
    Hres(data_dir=tmp_path / "a", **kw, name="other").download_and_prepare()
    assert reads == []  # another TFDS folder, the same chunks: nothing is read
    st = source.stat()
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    Hres(data_dir=tmp_path / "a", **kw, name="third").download_and_prepare()
    assert reads == ["2024-06-03T00", "2024-06-04T00"]


def test_two_build_workers_write_the_same_dataset(tmp_path: Path, monkeypatch) -> None:
    kw = {**NATL_KW, "chunk_hours": 24}
    one = Era5(data_dir=tmp_path / "one", **kw)
    two = Era5(data_dir=tmp_path / "two", build_workers=2, **kw)
    one.download_and_prepare()
    reads = count_reads(monkeypatch)  # in this process only: the workers read
    two.download_and_prepare()
    assert reads == []
    assert len(list(two.blob_root().glob("*.bin"))) == len(list(one.blob_root().glob("*.bin")))
    assert two.stats() == one.stats()
    for split in ("train", "validation", "test"):
        assert two.times(split).tolist() == one.times(split).tolist()
        for a, b in zip(read_all(one, split), read_all(two, split), strict=True):
            for v in ("msl", "10u"):
                np.testing.assert_array_equal(a["surf"][v], b["surf"][v])
            np.testing.assert_array_equal(a["atmos"]["w"], b["atmos"]["w"])
    with pytest.raises(DataError, match="build_workers"):
        Era5(data_dir=tmp_path, build_workers=0, **kw)


def test_a_truncated_chunk_file_is_named_and_rebuilt(tmp_path: Path, monkeypatch) -> None:
    builder = Hres(data_dir=tmp_path, **{**HRES_KW, "chunk_hours": 24})
    builder.download_and_prepare()
    src = builder.as_data_source("train")
    ref = src.reference(0)
    blob = builder.blob_root() / ref["file"]
    with open(blob, "r+b") as f:
        f.truncate(ref["offset"] + ref["nbytes"] // 2)
    with pytest.raises(DataError, match=rf"{ref['file']} holds .* bytes.*rebuild"):
        builder.as_data_source("train")[0]
    reads = count_reads(monkeypatch)
    again = Hres(data_dir=tmp_path, name="again", **{**HRES_KW, "chunk_hours": 24})
    again.download_and_prepare()
    assert len(reads) == 1  # only the damaged chunk is read again
    i = again.times("train").tolist().index(ref["time"])
    assert again.as_data_source("train")[i]["atmos"]["z"].shape == (3, 19, 36)
