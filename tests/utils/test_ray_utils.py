"""Reading Parquet through Ray Data the same way from every job."""
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data

from ray_suti.utils.ray_utils import read_parquet


def footer_readers() -> int:
    from ray._private.state import actors  # the GCS's actor table, dead actors included

    return sum(a["ActorClassName"] == "FooterReader" for a in actors().values())


def test_a_parquet_read_starts_one_footer_reader_per_cluster_cpu(tmp_path, ray_local, monkeypatch):
    monkeypatch.setattr(ray.data.DataContext.get_current(), "use_datasource_v2", True)  # Ray's default; see conftest
    for i in range(3):
        pq.write_table(pa.table({"x": list(range(10 * i, 10 * i + 10))}), tmp_path / f"{i}.parquet")
    before = footer_readers()
    assert sorted(read_parquet(str(tmp_path)).to_pandas()["x"]) == list(range(30))
    assert footer_readers() - before == 2  # the session's Ray has 2 CPUs; Ray Data alone starts 32 per read

    monkeypatch.setenv("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "3")  # a user's own setting wins
    before = footer_readers()
    assert read_parquet(str(tmp_path)).materialize().count() == 30
    assert footer_readers() - before == 3
