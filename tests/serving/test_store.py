"""The subject store on its own: tenants, quotas, time-to-live, bounded photos, concurrent writers."""
import io
import threading
import time

import pytest
from PIL import Image

from ray_suti.serving.store import QuotaError, SubjectError, SubjectStore


def phone_photo(path, size=(4032, 3024)) -> bytes:
    """A DreamBench photo blown up to a 12 MP phone photo (JPEG, as phones send them)."""
    buf = io.BytesIO()
    Image.open(path).convert("RGB").resize(size, Image.BICUBIC).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos(dreambench_dir):
    return [p.read_bytes() for p in sorted((dreambench_dir / "dog2").glob("*.jpg"))[:5]]


def test_tenants_get_their_own_ids_and_never_see_each_other(tmp_path, photos):
    store = SubjectStore(str(tmp_path))
    a = store.put("acme", photos[:2], ["a dog", "a dog"])
    assert store.put("acme", photos[:2], ["a dog", "a dog"]) == a  # same photos, same tenant: same id
    b = store.put("globex", photos[:2], ["a dog", "a dog"])
    assert b != a  # same photos, another tenant: another id
    assert store.exists("acme", a) and not store.exists("globex", a) and not store.exists("acme", b)
    assert store.get("globex", a) is None and store.meta("globex", a) is None
    assert not store.delete("globex", a) and store.exists("acme", a)  # nobody deletes another's subject
    assert [m["subject_id"] for m in store.list("acme")[0]] == [a]
    assert store.meta("acme", a)["captions"] == ["a dog", "a dog"] and store.meta("acme", a)["num_images"] == 2
    assert store.meta("acme", "../../etc/passwd") is None


def test_listing_pages_through_every_subject_once(tmp_path, photos):
    store = SubjectStore(str(tmp_path))
    ids = sorted(store.put("acme", [p]) for p in photos)
    seen, cursor = [], ""
    while cursor is not None:
        page, cursor = store.list("acme", limit=2, after=cursor)
        assert len(page) <= 2
        seen += [m["subject_id"] for m in page]
    assert seen == ids


def test_quotas_refuse_new_subjects_but_not_repeats(tmp_path, photos):
    store = SubjectStore(str(tmp_path), max_subjects=2)
    a = store.put("acme", photos[:1])
    store.put("acme", photos[1:2])
    with pytest.raises(QuotaError, match="subject quota"):
        store.put("acme", photos[2:3])
    assert store.put("acme", photos[:1]) == a  # already stored: no new bytes
    store.put("globex", photos[2:3])  # quotas are per tenant
    small = SubjectStore(str(tmp_path / "b"), max_bytes=store.meta("acme", a)["bytes"] + 10)
    small.put("acme", photos[:1])
    with pytest.raises(QuotaError, match="storage quota"):
        small.put("acme", photos[1:2])
    store.delete("acme", a)
    store.put("acme", photos[2:3])  # room again


def test_subjects_expire_after_their_time_to_live(tmp_path, photos):
    store = SubjectStore(str(tmp_path), ttl_s=0.5)
    a = store.put("acme", photos[:1])
    assert store.exists("acme", a) and store.meta("acme", a)["expires"] > time.time()
    time.sleep(0.7)
    assert not store.exists("acme", a) and store.list("acme")[0] == []
    assert not (tmp_path / store._tenant_root("acme").rsplit("/", 1)[-1] / a).exists()  # removed when touched


def test_phone_photos_are_stored_at_most_max_side_a_side(tmp_path, dreambench_dir, record_property):
    paths = sorted((dreambench_dir / "dog2").glob("*.jpg"))[:5]
    sent = [phone_photo(p) for p in paths]
    store = SubjectStore(str(tmp_path))
    meta = store.meta("acme", store.put("acme", sent))
    images, _ = store.get("acme", meta["subject_id"])
    assert all(max(img.size) == 1024 for img in images) and meta["sizes"][0] == [1024, 768]
    decoded = 5 * 4032 * 3024 * 3
    record_property("bytes_per_subject", meta["bytes"])
    print(f"5 phone photos (12 MP, {sum(map(len, sent)) / 1e6:.1f} MB sent, {decoded / 1e6:.0f} MB decoded) "
          f"-> {meta['bytes'] / 1e6:.1f} MB stored")
    count, used = store.usage("acme")
    assert meta["bytes"] < 12e6 and count == 1 and meta["bytes"] < used < meta["bytes"] + 1000  # + meta.json


def test_concurrent_registrations_of_the_same_photos_agree(tmp_path, photos, monkeypatch):
    """Threads behind a barrier: one id, no error, and no reader ever sees a partial subject."""
    store = SubjectStore(str(tmp_path))
    barrier, ids, errors, partial = threading.Barrier(8), [], [], []

    def register():
        barrier.wait()
        try:
            ids.append(store.put("acme", photos[:3], ["a", "b", "c"]))
        except Exception as e:  # noqa: BLE001 (any error fails the test)
            errors.append(e)

    def read():
        barrier.wait()
        for _ in range(200):
            for m in store.list("acme")[0]:
                got = store.get("acme", m["subject_id"])
                if got is None or len(got[0]) != 3:
                    partial.append(m)

    threads = [threading.Thread(target=register) for _ in range(7)] + [threading.Thread(target=read)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(ids)) == 1 and len(ids) == 7 and not partial
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]  # no temporaries left


def test_bad_photos_are_refused_with_a_reason(tmp_path, photos):
    store = SubjectStore(str(tmp_path))
    for bad, reason in (([b"<html>"], "not image"), ([photos[0][:3000]], "truncated"), (photos * 2, "1 to 5")):
        with pytest.raises(SubjectError, match=reason):
            store.put("acme", bad)
    assert store.usage("acme") == (0, 0)


def _register_in_a_process(root, photos, barrier, out):
    barrier.wait()
    try:
        out.put(SubjectStore(root).put("acme", photos, ["a", "b"]))
    except Exception as e:  # noqa: BLE001 (reported to the test)
        out.put(f"error: {e!r}")


def test_concurrent_registrations_from_several_processes_agree(tmp_path, photos):
    """As replicas on one shared store do: processes behind a barrier, one id, nothing partial."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_register_in_a_process, args=(str(tmp_path), photos[:2], barrier, out)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    ids = [out.get(timeout=5) for _ in procs]
    assert len(set(ids)) == 1 and not ids[0].startswith("error"), ids
    store = SubjectStore(str(tmp_path))
    assert len(store.get("acme", ids[0])[0]) == 2 and store.usage("acme")[0] == 1
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
