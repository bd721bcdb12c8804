"""s3:// roots through tensorstore's s3 driver, against a local S3-compatible server (moto) on 127.0.0.1
(the ``bucket`` fixture of conftest.py; skipped without moto)."""
from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from ckpt.training import Checkpointer
from ckpt.training import preservation_policies as pp
from ckpt.training import save_decision_policies as sdp
from tests import fsutil, procs

ALWAYS = sdp.FixedIntervalPolicy(1)


def state(step: int) -> dict:
    return {"big": np.full(300_000, step, np.float32), "small": np.arange(5) * step, "step": step, "tag": "s3"}


def test_s3_round_trip_listing_and_metadata(bucket):
    with Checkpointer(bucket, save_decision_policy=ALWAYS, custom_metadata={"run": "a"}) as ckptr:
        ckptr.save(0, state(0), metrics={"loss": 1.0})
        ckptr.save_async(1, state(1), metrics={"loss": 0.5}).result(timeout=60)
        assert str(ckptr.directory) == bucket
        assert str(ckptr.latest.path) == f"{bucket}/1"
    with Checkpointer(bucket) as again:
        assert [c.step for c in again.checkpoints] == [0, 1]
        assert again.checkpoints[0].metrics == {"loss": 1.0}
        assert again.root_metadata().custom_metadata == {"run": "a"}
        loaded = again.load()
        np.testing.assert_array_equal(loaded["big"], state(1)["big"])
        np.testing.assert_array_equal(loaded["small"], state(1)["small"])
        assert loaded["step"] == 1 and loaded["tag"] == "s3"
        assert again.metadata(0).metadata["big"].shape == (300_000,)


def test_s3_garbage_collection_deletes_whole_steps(bucket):
    with Checkpointer(bucket, save_decision_policy=ALWAYS, preservation_policy=pp.LatestN(2)) as ckptr:
        for step in range(5):
            ckptr.save(step, state(step))
        assert [c.step for c in ckptr.checkpoints] == [3, 4]
    from ckpt.objectstore import ObjectPath

    assert ObjectPath(bucket).children() == ["3", "4"]


CRASHER = """
import sys
import numpy as np
from ckpt.training import Checkpointer, save_decision_policies as sdp, preservation_policies as pp
with Checkpointer(sys.argv[1], save_decision_policy=sdp.FixedIntervalPolicy(1),
                  preservation_policy=pp.LatestN(3)) as ckptr:
    for step in range(10_000):
        ckptr.save_async(step, {"big": np.full(400_000, step, np.float32), "step": step})
        print(f"saving {step}", flush=True)
"""


def test_s3_a_save_killed_midway_leaves_only_committed_steps(bucket):
    proc = procs.start(CRASHER, bucket)
    try:
        procs.wait_for_line(proc, "saving 6", timeout=120)
    finally:
        procs.stop(proc)
    with Checkpointer(bucket, save_decision_policy=ALWAYS, cleanup_tmp_directories=True) as ckptr:
        steps = [c.step for c in ckptr.checkpoints]
        assert steps and steps == sorted(steps)
        for step in steps:
            loaded = ckptr.load(step)
            assert loaded["step"] == step
            np.testing.assert_array_equal(loaded["big"], np.full(400_000, step, np.float32))
        from ckpt.objectstore import ObjectPath

        assert sorted(ObjectPath(bucket).children(), key=int) == [str(s) for s in steps]  # uncommitted removed
        ckptr.save(steps[-1] + 1, state(0))
        assert ckptr.latest.step == steps[-1] + 1


@pytest.mark.parametrize("chunk, key_path", [("packed/c/0", "state['small']"), ("arrays/0/c/0", "state['big']")])
def test_s3_a_damaged_chunk_fails_the_load_naming_the_key_path(bucket, chunk, key_path):
    from ckpt import errors
    from ckpt.objectstore import ObjectPath

    with Checkpointer(bucket, save_decision_policy=ALWAYS) as ckptr:
        ckptr.save(0, state(1))
    fsutil.flip(ObjectPath(f"{bucket}/0/{chunk}"), 9)
    with Checkpointer(bucket) as again, pytest.raises(errors.CheckpointCorruptedError) as info:
        again.load(0)
    assert key_path in info.value.key_paths


def test_s3_a_leaf_of_several_chunks_is_read_chunk_by_chunk_and_each_chunk_checked(bucket, monkeypatch):
    from ckpt import errors
    from ckpt import format as fmt
    from ckpt.objectstore import ObjectPath

    monkeypatch.setattr(fmt, "ARRAY_CHUNK_BYTES", 300 * 1200)  # 300 rows of 1,200 bytes: chunks c/0/0 .. c/3/0
    big = np.random.default_rng(0).random((1000, 300), dtype=np.float32)
    with Checkpointer(bucket, save_decision_policy=ALWAYS) as ckptr:
        ckptr.save(0, {"big": big, "step": 0})
    step = ObjectPath(f"{bucket}/0")
    assert sorted((step / "arrays/0/c").children(), key=int) == ["0", "1", "2", "3"]
    with Checkpointer(bucket) as again:
        np.testing.assert_array_equal(again.load(0)["big"], big)
    fsutil.flip(step / "arrays/0/c/3/0", 5)  # the edge chunk: 100 rows of data, 200 of fill
    with Checkpointer(bucket) as again, pytest.raises(errors.CheckpointCorruptedError, match="chunk c/3/0 ") as info:
        again.load(0)
    assert info.value.key_paths == ("state['big']",)


def test_s3_a_leaf_whose_array_cannot_be_opened_fails_the_load_saying_so_once(bucket, monkeypatch):
    from ckpt import errors
    from ckpt import format as fmt
    from ckpt.objectstore import ObjectPath

    monkeypatch.setattr(fmt, "ARRAY_CHUNK_BYTES", 300 * 1200)  # 4 chunks, each failing the same way
    with Checkpointer(bucket, save_decision_policy=ALWAYS) as ckptr:
        ckptr.save(0, {"big": np.ones((1000, 300), np.float32), "step": 0})
    ObjectPath(f"{bucket}/0/arrays/0/zarr.json").unlink()
    with Checkpointer(bucket) as again, pytest.raises(errors.CheckpointCorruptedError) as info:
        again.load(0)
    assert info.value.key_paths == ("state['big']",)
    assert str(info.value).count("cannot be opened") == 1


def test_s3_a_step_saved_without_word_sums_is_checked_against_its_crc32s(bucket):
    from ckpt import errors
    from ckpt.objectstore import ObjectPath

    with Checkpointer(bucket, save_decision_policy=ALWAYS) as ckptr:
        ckptr.save(0, state(1))
    step = ObjectPath(f"{bucket}/0")
    fsutil.rewrite_tree(step, fsutil.without_word_sums)
    with Checkpointer(bucket) as again:
        np.testing.assert_array_equal(again.load(0)["big"], state(1)["big"])
    fsutil.flip(step / "arrays/0/c/0", 9)
    with Checkpointer(bucket) as again, pytest.raises(errors.CheckpointCorruptedError, match="chunk_crc32") as info:
        again.load(0)
    assert info.value.key_paths == ("state['big']",)


def test_s3_deleting_a_step_leaves_an_object_named_as_the_step_itself(bucket):
    from ckpt.objectstore import ObjectPath

    with Checkpointer(bucket, save_decision_policy=ALWAYS, preservation_policy=pp.LatestN(1)) as ckptr:
        ckptr.save(3, state(3))
        ObjectPath(f"{bucket}/3").write_bytes(b"a user's")  # the key 'runs/exp/3', beside the step's 'runs/exp/3/...'
        ckptr.save(4, state(4))  # garbage collection deletes step 3
        assert [c.step for c in ckptr.checkpoints] == [4]
    assert ObjectPath(f"{bucket}/3").read_bytes() == b"a user's"  # was: deleted with the step
    assert not ObjectPath(f"{bucket}/3/manifest.json").exists()


def test_s3_loading_a_path_that_holds_nothing_says_so(bucket):
    import ckpt
    from ckpt import errors

    for read in (ckpt.load, ckpt.metadata):
        with pytest.raises(errors.CheckpointNotFoundError, match=f"no checkpoint at {bucket}/nothing: the path does "
                                                                 "not exist"):
            read(f"{bucket}/nothing")  # was: StepNotFoundError, 'deleted while it was being read'


def test_s3_a_bucket_that_does_not_exist_is_named_by_every_entry_point(bucket, capsys):
    import ckpt
    from ckpt import cli

    missing = "s3://" + bucket.split("/")[2] + "-missing/runs/exp"
    said = "the bucket '" + bucket.split("/")[2] + "-missing' does not exist"
    with pytest.raises(FileNotFoundError, match=said):  # was: ValueError, tensorstore's text and the server's XML
        Checkpointer(missing)
    with pytest.raises(FileNotFoundError, match=said):
        ckpt.save(f"{missing}/one", state(0))
    with pytest.raises(FileNotFoundError, match=said):
        ckpt.load(f"{missing}/one")
    assert cli.main(["ls", missing]) == 2  # was: a traceback
    assert said in capsys.readouterr().err


def test_s3_loading_a_step_without_its_manifest_says_it_is_not_committed(bucket):
    import ckpt
    from ckpt import errors
    from ckpt.objectstore import ObjectPath

    ckpt.save(f"{bucket}/one", state(0))
    ObjectPath(f"{bucket}/one/manifest.json").unlink()  # what a save killed before its commit leaves
    for read in (ckpt.load, ckpt.metadata):
        with pytest.raises(errors.CheckpointCorruptedError, match="manifest.json is missing: .* is not a committed"):
            read(f"{bucket}/one")  # was: StepNotFoundError, 'deleted while it was being read'


def test_s3_an_orbax_run_there_is_said_to_be_read_in_local_directories_only_and_left_whole(bucket, caplog, capsys):
    """ckpt reads Orbax's steps in local directories; on an object store a Checkpointer skipped them saying each
    'is not a committed step', and ckpt.load said the step had 'none of the files ckpt writes'."""
    from pathlib import Path

    import ckpt
    from ckpt import cli, errors
    from ckpt.objectstore import ObjectPath

    item = Path(__file__).parent / "orbax_0_5" / "no_ocdbt" / "1"
    names = [str(p.relative_to(item)) for p in sorted(item.rglob("*")) if p.is_file()]
    for name in names:
        ObjectPath(f"{bucket}/1/{name}").write_bytes((item / name).read_bytes())
    ObjectPath(f"{bucket}/1/commit_success.txt").write_text("Checkpoint commit was successful to s3://...")
    with Checkpointer(bucket, preservation_policy=pp.LatestN(1)) as ckptr:
        assert ckptr.checkpoints == []
        ckptr.save(2, state(2))
        ckptr.save(3, state(3))
    assert "s3://" in caplog.text and "a checkpoint Orbax wrote, which ckpt reads in local directories only" in caplog.text
    for read in (ckpt.load, ckpt.metadata):
        with pytest.raises(errors.UnsupportedLayoutError, match="Orbax wrote, which ckpt reads in local directories"):
            read(f"{bucket}/1")
    assert cli.main(["show", f"{bucket}/1"]) == 2 and "local directories only" in capsys.readouterr().err
    assert all(ObjectPath(f"{bucket}/1/{name}").exists() for name in names)


REFUSED = """
import sys
import numpy as np
import ckpt
from ckpt.training import Checkpointer
try:
    Checkpointer(sys.argv[1])
except PermissionError as e:
    print("refused:", e)
"""


def test_s3_credentials_the_store_refuses_are_a_permission_error_naming_the_root(bucket, s3_user):
    s3_user({})
    env = {"AWS_ACCESS_KEY_ID": "AKIAUNKNOWN", "AWS_SECRET_ACCESS_KEY": "wrong"}
    result = procs.run_script(REFUSED, bucket, **env)
    assert f"refused: [Errno 13] {bucket}: access denied (PERMISSION_DENIED: InvalidAccessKeyId" in result.stdout, result.stderr
    assert "http_response_body" not in result.stdout  # was: ValueError, tensorstore's text and the server's XML
    listed = procs.run_script(procs.REPO / "ckpt" / "cli.py", "ls", bucket, **env)
    assert listed.returncode == 2 and "access denied" in listed.stderr  # was: a traceback


COLLECTED = """
import sys
import numpy as np
from ckpt.training import Checkpointer, preservation_policies as pp, save_decision_policies as sdp
with Checkpointer(sys.argv[1], save_decision_policy=sdp.FixedIntervalPolicy(1), preservation_policy=pp.LatestN(1)) as c:
    c.save(0, {"w": np.arange(3)})
    try:
        c.save(1, {"w": np.arange(3) + 1})
    except OSError as e:
        print("failed:", e)
    print("latest", c.latest.step, "step 0", c.load(0)["w"].tolist())
"""


def test_s3_a_delete_the_store_refuses_fails_garbage_collection_naming_the_step_after_the_commit(bucket, s3_user):
    env = s3_user({"s3:DeleteObject": "*"})
    result = procs.run_script(COLLECTED, bucket, **env)
    assert ("failed: the checkpoint was committed, but garbage collection could not delete: step 0 "
            f"({bucket}/0): [Errno 13] {bucket}/0/manifest.json: access denied") in result.stdout, result.stderr
    assert "latest 1 step 0 [0, 1, 2]" in result.stdout  # was: tensorstore's ValueError, naming no step


OVERWRITE_REFUSED = """
import sys
import numpy as np
from ckpt.training import Checkpointer
with Checkpointer(sys.argv[1]) as ckptr:
    try:
        ckptr.save(1, {"big": np.zeros(300_000, np.float32)}, overwrite=True)
    except PermissionError as e:
        print("refused:", e)
    print("listed", [c.step for c in ckptr.checkpoints], "latest", ckptr.latest)
"""


def test_s3_an_overwrite_that_fails_leaves_its_step_unlisted_once_it_is_gone(bucket, s3_user):
    with Checkpointer(bucket, save_decision_policy=ALWAYS) as ckptr:
        ckptr.save(1, state(1))
    name, prefix = bucket.removeprefix("s3://").split("/", 1)
    env = s3_user({"s3:PutObject": f"arn:aws:s3:::{name}/{prefix}/1/arrays/*"})
    result = procs.run_script(OVERWRITE_REFUSED, bucket, **env)
    assert "refused: [Errno 13] writing ['big']" in result.stdout, result.stdout + result.stderr[-3000:]
    # (an object store has no rename: the step was deleted before the new one was written, as the README says)
    assert "listed [] latest None" in result.stdout  # was: [1] and step 1, which a load then did not find


READ_REFUSED = """
import sys
import ckpt
try:
    ckpt.load(sys.argv[1])
except PermissionError as e:
    print("refused:", e)
"""


@pytest.mark.parametrize("objects", ["arrays", "packed"])
def test_s3_a_read_the_store_refuses_is_a_permission_error_not_damage(bucket, s3_user, objects):
    import ckpt

    ckpt.save(f"{bucket}/one", state(1))
    name, prefix = bucket.removeprefix("s3://").split("/", 1)
    env = s3_user({"s3:GetObject": f"arn:aws:s3:::{name}/{prefix}/one/{objects}/*"})
    loaded = procs.run_script(READ_REFUSED, f"{bucket}/one", **env)
    assert "refused: [Errno 13] " in loaded.stdout and "access denied" in loaded.stdout, loaded.stderr[-3000:]
    verified = procs.run_script(procs.REPO / "ckpt" / "cli.py", "verify", f"{bucket}/one", **env)
    assert verified.returncode == 2 and "access denied" in verified.stderr  # was: 1, 'DAMAGED'
    assert "DAMAGED" not in verified.stdout


QUIET = """
import sys
import numpy as np
import ckpt
ckpt.save(sys.argv[1], {"big": np.ones(300_000, np.float32), "small": np.arange(3)})
assert ckpt.load(sys.argv[1])["small"].tolist() == [0, 1, 2]
"""


def test_s3_credentials_in_the_environment_are_used_without_logging_errors(bucket, tmp_path):
    result = procs.run_script(QUIET, f"{bucket}/one", HOME=str(tmp_path))  # no ~/.aws
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr == ""  # was: 5 lines 'E... Failed to open file ... .aws/config' for each array opened


def test_s3_a_reader_listing_while_a_writer_deletes_a_step_neither_lists_it_nor_warns(bucket, monkeypatch, caplog):
    from ckpt import schema, storage
    from ckpt.objectstore import ObjectPath

    with Checkpointer(bucket, save_decision_policy=ALWAYS) as ckptr:
        ckptr.save(0, state(0))
        ckptr.save(1, state(1))
    manifest_bytes = schema.manifest_bytes

    def deleted_meanwhile(step_dir):  # the writer's garbage collection deletes step 0 between the listing and the read
        if step_dir.name == "0" and ObjectPath(f"{step_dir}/manifest.json").exists():
            storage.delete_dir(step_dir)
        return manifest_bytes(step_dir)

    monkeypatch.setattr(schema, "manifest_bytes", deleted_meanwhile)
    with Checkpointer(bucket) as reader:
        assert [c.step for c in reader.checkpoints] == [1]
    assert "skipping" not in caplog.text  # was: 'skipping .../0 ...: step 0 is not a committed step, so ckpt
    #                                       never lists, overwrites or deletes it', for each step deleted so


def test_s3_a_checkpoint_at_a_buckets_root_is_saved_and_loaded(bucket):
    import ckpt
    from ckpt import errors

    whole = bucket.rsplit("/", 2)[0]  # s3://<bucket>
    with pytest.raises(errors.CheckpointNotFoundError, match="the path does not exist"):
        ckpt.load(whole)  # was: OSError (before, ValueError) 'Invalid S3 object name', for every entry point
    ckpt.save(whole, state(2))
    assert ckpt.load(whole)["step"] == 2
    assert ckpt.metadata(whole).metadata["big"].shape == (300_000,)


WRITE_REFUSED = """
import sys
import numpy as np
from ckpt.training import Checkpointer
with Checkpointer(sys.argv[1]) as ckptr:
    for save in (ckptr.save, lambda *args: ckptr.save_async(*args).result()):
        try:
            save(1, {"big": np.ones(300_000, np.float32), "small": np.arange(3)})
        except PermissionError as e:
            print("refused:", e)
from ckpt.objectstore import ObjectPath
print("left:", ObjectPath(sys.argv[1]).children())
"""


def test_s3_a_write_the_store_refuses_is_a_permission_error_naming_the_leaf_and_leaves_nothing(bucket, s3_user):
    name, prefix = bucket.removeprefix("s3://").split("/", 1)
    env = s3_user({"s3:PutObject": f"arn:aws:s3:::{name}/{prefix}/1/arrays/*"})
    result = procs.run_script(WRITE_REFUSED, bucket, **env)
    said = f"refused: [Errno 13] writing ['big'] to {bucket}/1: access denied (PERMISSION_DENIED: "
    assert result.stdout.count(said) == 2, result.stdout + result.stderr[-3000:]  # was: OSError, no errno, the XML
    assert "http_response_body" not in result.stdout
    assert "left: []" in result.stdout


def test_s3_checkpointables_a_handler_or_the_object_itself_writes_are_saved_and_loaded(bucket):
    import ckpt
    from tests.test_custom_checkpointables import Counter, Vocab, registry_context

    with Checkpointer(bucket, context=registry_context()) as ckptr:  # the handler of ckpt.handlers' example
        ckptr.save_checkpointables(0, {"state": {"w": np.ones(3)}, "vocab": Vocab(["a", "é"])})
        assert ckptr.load_checkpointables(0)["vocab"] == Vocab(["a", "é"])  # was: AttributeError, no write_text
    ckpt.save_checkpointables(f"{bucket}/m", {"counter": Counter(7)})
    counter = Counter()
    ckpt.load_checkpointables(f"{bucket}/m", {"counter": counter})
    assert counter.n == 7


def test_s3_opening_a_root_reads_each_manifest_once_and_its_listing_tells_the_steps_without_one(bucket, monkeypatch):
    from ckpt.objectstore import ObjectPath

    with Checkpointer(bucket, save_decision_policy=ALWAYS) as ckptr:
        for step in range(3):
            ckptr.save(step, state(step))
    manifests = [f"{bucket}/{step}/manifest.json" for step in range(3)]
    requests = []
    wait = ObjectPath._wait

    def counted(self, future):
        requests.append(str(self))
        return wait(self, future)

    monkeypatch.setattr(ObjectPath, "_wait", counted)
    with Checkpointer(bucket) as ckptr:
        assert [c.step for c in ckptr.checkpoints] == [0, 1, 2] and ckptr.latest.metrics is None
        assert sorted(r for r in requests if r in manifests) == manifests  # was: each twice, checked to exist, then read
        requests.clear()
        ckptr.save(3, state(3), force=True)  # the first save sweeps the root: its listing tells what to remove
        assert [r for r in requests if r in manifests] == []  # was: each checked to exist
    requests.clear()
    with Checkpointer(bucket, lightweight_initialize=True) as ckptr:
        assert [c.step for c in ckptr.checkpoints] == [0, 1, 2, 3]
    assert [r for r in requests if r.endswith("manifest.json")] == []  # was: each checked to exist


def test_s3_opening_a_root_reads_the_manifests_of_its_steps_at_once_not_one_after_another(bucket, monkeypatch):
    from ckpt import schema

    with Checkpointer(bucket, save_decision_policy=ALWAYS) as ckptr:
        for step in range(3):
            ckptr.save(step, {"w": np.arange(3) + step})
    together = threading.Barrier(3, timeout=10)
    manifest_bytes = schema.manifest_bytes

    def read_together(step_dir):  # read one after another (each a round trip: 200 steps 30 ms away took 6.5 s),
        together.wait()  # the first waits for the others in vain: BrokenBarrierError
        return manifest_bytes(step_dir)

    monkeypatch.setattr(schema, "manifest_bytes", read_together)
    with Checkpointer(bucket) as ckptr:
        assert [c.step for c in ckptr.checkpoints] == [0, 1, 2]


@pytest.mark.parametrize("url", ["s3://ab/runs/exp", "s3://my bucket/runs/exp", "gs://My_Bucket/runs/exp"])
def test_a_bucket_name_the_store_refuses_is_a_value_error_naming_the_url_at_every_entry_point(url, capsys):
    import ckpt
    from ckpt import cli

    said = f"{url!r} does not name a bucket: "
    for call in (Checkpointer, ckpt.load, lambda u: ckpt.save(u, {"w": 1})):
        with pytest.raises(ValueError, match=said):  # was: tensorstore's 'Invalid S3 bucket name: "ab"', no URL
            call(url)
    assert cli.main(["ls", url]) == 2  # was: a ValueError traceback
    assert said in capsys.readouterr().err


def test_s3_without_a_region_set_the_buckets_own_region_is_used_not_us_east_1(bucket, monkeypatch):
    import ckpt
    from ckpt.objectstore import ObjectPath

    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    # (no region: tensorstore asks the bucket's; was us-east-1, whose endpoint AWS answers for any other
    # region's bucket with a redirect, a failed request)
    assert "aws_region" not in ObjectPath(bucket).kvstore()
    ckpt.save(f"{bucket}/one", {"w": np.arange(3)})  # a server of no region (this one) is used as before
    assert ckpt.load(f"{bucket}/one")["w"].tolist() == [0, 1, 2]
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    assert ObjectPath(bucket).kvstore()["aws_region"] == "eu-west-1"
    monkeypatch.setenv("AWS_REGION", "ap-south-1")
    assert ObjectPath(bucket).kvstore()["aws_region"] == "ap-south-1"


@pytest.mark.parametrize("endpoint", ["127.0.0.1:9000", "HTTP://127.0.0.1:9000"])
def test_an_endpoint_without_its_scheme_is_a_value_error_naming_it_and_the_url_at_every_entry_point(endpoint,
                                                                                                   monkeypatch, capsys):
    import ckpt
    from ckpt import cli

    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    url = "s3://bucket/runs/exp"
    said = f"{url}: AWS_ENDPOINT_URL is {endpoint!r}, which is not an http:// or https:// URL"
    for call in (Checkpointer, ckpt.load, lambda u: ckpt.save(u, {"w": 1})):
        with pytest.raises(ValueError, match=said):  # was: tensorstore's 'Endpoint ... has invalid scheme', no URL
            call(url)
    assert cli.main(["ls", url]) == 2  # was: a ValueError traceback
    assert said in capsys.readouterr().err


@pytest.mark.parametrize("endpoint, advice", [
    ("HTTP://127.0.0.1:9000", "which is not an http:// or https:// URL: write its scheme in lowercase (http://127"),
    ("http:/127.0.0.1:9000", "which is not an http:// or https:// URL (such as http://127.0.0.1:9000 or https://"),
    ("http//127.0.0.1:9000", "which is not an http:// or https:// URL (such as http://127.0.0.1:9000 or https://"),
    ("http://127.0.0.1:9000 ", "which holds white space: remove it"),
    ("http://", "which names no host: give one")])
def test_a_misspelled_endpoint_is_a_value_error_saying_what_to_change(endpoint, advice, monkeypatch):
    """Was: 'give its scheme too (such as http://HTTP://127.0.0.1:9000)', a scheme put before the scheme; for white
    space, tensorstore's curl error naming neither the variable nor the space; for no host, 4 s of retries."""
    import ckpt

    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    with pytest.raises(ValueError) as error:
        ckpt.load("s3://bucket/runs/exp")
    assert str(error.value).startswith(f"s3://bucket/runs/exp: AWS_ENDPOINT_URL is {endpoint!r}, {advice}")
    assert "http://http" not in str(error.value).lower()


@pytest.mark.parametrize("path", ["bucket", "/s3/v1"])
def test_s3_a_request_failing_below_an_endpoints_path_names_that_path(bucket, s3_server, monkeypatch, path):
    """Was: the bucket's name given in the endpoint too raised 'NOT_FOUND: NoSuchKey' and the server's XML, another
    path that the bucket (which exists) does not exist, neither naming the endpoint's path, where every request went."""
    path = bucket.split("/")[2] if path == "bucket" else path.strip("/")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"{s3_server}/{path}")
    with pytest.raises(OSError) as error:
        Checkpointer(bucket)
    assert error.value.strerror.startswith(bucket)
    assert error.value.strerror.endswith(f"; AWS_ENDPOINT_URL is '{s3_server}/{path}', whose path (/{path}) every request "
                                     f"is sent below: give the server's address alone ({s3_server}) unless the "
                                     "server is served there")


def test_s3_aws_endpoint_url_s3_is_used_before_aws_endpoint_url_as_aws_sdks_do(bucket, s3_server, monkeypatch):
    import ckpt

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # other services' endpoint: nothing answers there
    ckpt.save(f"{bucket}/one", {"w": np.arange(3)})  # was: OSError 'the store did not answer' (the port 1 above)
    assert ckpt.load(f"{bucket}/one")["w"].tolist() == [0, 1, 2]
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "127.0.0.1:9000")
    with pytest.raises(ValueError, match=f"{bucket}: AWS_ENDPOINT_URL_S3 is '127.0.0.1:9000', which is not an http"):
        Checkpointer(bucket)


def test_s3_a_root_given_as_an_epath_path_as_orbax_code_gives_it_is_the_bucket_not_a_local_directory(bucket):
    import ckpt
    from ckpt import storage
    from ckpt.objectstore import ObjectPath

    epath = pytest.importorskip("etils.epath")
    root = epath.Path(bucket)  # (os.fspath keeps 's3://', where pathlib would give 's3:/')
    assert storage.location(root) == ObjectPath(bucket)  # was: PosixPath('/s3/<bucket>/runs/exp'), on the local disk
    with Checkpointer(root) as ckptr:
        ckptr.save(0, {"w": np.arange(3)})
    assert ObjectPath(bucket).children() == ["0"] and ckpt.load(root / "0")["w"].tolist() == [0, 1, 2]


UNREACHED = """
import sys, time
import ckpt
from ckpt import cli
from ckpt.training import Checkpointer
for name, call in [("open", Checkpointer), ("load", ckpt.load), ("save", lambda url: ckpt.save(url, {"w": 1})),
                   ("ls", lambda url: cli.main(["ls", url]))]:
    start = time.monotonic()
    try:
        print(name, "returned", call(sys.argv[1]))
    except OSError as e:
        print(name, f"{time.monotonic() - start:.0f}s", e)
"""


def test_an_endpoint_that_does_not_answer_fails_the_first_request_in_seconds_naming_the_url():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    url = "s3://bucket/runs/exp"
    result = procs.run_script(UNREACHED, url, timeout=100, AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="test",
                              AWS_SECRET_ACCESS_KEY="test")  # was: each entry point retried for about 15 minutes
    for name in ("open", "load", "save"):
        line = next(line for line in result.stdout.splitlines() if line.startswith(name))
        assert int(line.split()[1][:-1]) < 20 and f" {url}" in line and "the store did not answer" in line, result.stdout
    assert "ls returned 2" in result.stdout and f"error: [Errno 5] {url}" in result.stderr


def bytes_fetched(monkeypatch, path) -> list[int]:
    """The number of bytes of each request about the object ``path`` that fetched it (through ObjectPath._wait),
    appended to the list returned as they come, until the test ends."""
    from ckpt.objectstore import ObjectPath

    fetched, wait = [], ObjectPath._wait

    def counted(self, future):
        result = wait(self, future)
        if self == path:
            fetched.append(len(getattr(result, "value", b"")))
        return result

    monkeypatch.setattr(ObjectPath, "_wait", counted)
    return fetched


def test_s3_a_path_that_is_a_large_object_is_told_apart_without_fetching_its_bytes(bucket, monkeypatch):
    import ckpt
    from ckpt import errors
    from ckpt.objectstore import ObjectPath

    model = ObjectPath(f"{bucket}/model.bin")  # a user's file, named by mistake as a checkpoint
    model.write_bytes(bytes(4 << 20))
    fetched = bytes_fetched(monkeypatch, model)
    with pytest.raises(errors.ForeignEntryError, match="holds an object"):
        ckpt.save(str(model), state(0))
    with pytest.raises(errors.InvalidLayoutError, match="is not a checkpoint"):
        ckpt.load(str(model))
    assert fetched and set(fetched) == {0}  # was: its 4 MiB, fetched by every check that something is there


def test_s3_a_json_file_larger_than_a_reader_accepts_is_refused_without_fetching_its_bytes(bucket, monkeypatch, caplog):
    import ckpt
    from ckpt import errors
    from ckpt import format as fmt
    from ckpt.objectstore import ObjectPath

    ckpt.save(f"{bucket}/0", state(0))
    ckpt.save(f"{bucket}/1", state(1))
    monkeypatch.setattr(fmt, "MANIFEST_MAX_BYTES", 64 << 10)  # (as a 300 MiB manifest.json is to the 16 MiB accepted)
    manifest = ObjectPath(f"{bucket}/1/manifest.json")
    manifest.write_bytes(b" " * (1 << 20))
    fetched = bytes_fetched(monkeypatch, manifest)
    with Checkpointer(bucket) as ckptr:
        assert [c.step for c in ckptr.checkpoints] == [0]
    assert "manifest.json has more than the 65536 bytes a reader accepts" in caplog.text
    with pytest.raises(errors.CheckpointCorruptedError, match="manifest.json has more than the 65536 bytes"):
        ckpt.load(f"{bucket}/1")
    assert max(fetched, default=0) <= 1  # was: its 1 MiB, fetched whole (a 300 MiB one took the reader to 1.3 GiB)


def test_s3_a_root_of_steps_named_as_one_checkpoint_is_not_a_checkpoint_and_load_weights_reads_its_latest(bucket):
    import ckpt
    from ckpt import errors

    torch = pytest.importorskip("torch")
    from ckpt.integrations.lightning import weights

    with Checkpointer(bucket, save_decision_policy=ALWAYS) as ckptr:
        for step in (3, 5):
            ckptr.save_checkpointables(step, {"model": {"weight": torch.full((2,), float(step))}})
    with pytest.raises(errors.InvalidLayoutError, match="has none of the files ckpt writes"):
        ckpt.load(bucket)  # as for a local root; was: CheckpointCorruptedError, 'manifest.json is missing'
    model = torch.nn.Linear(2, 1, bias=False)
    model.weight = torch.nn.Parameter(torch.zeros(2))
    assert weights.load_weights(model, bucket) == 5  # was: CheckpointCorruptedError
    assert model.weight.tolist() == [5.0, 5.0]


def test_s3_deleting_a_checkpoint_whose_deletion_or_save_a_crash_cut_short_finishes_it(bucket):
    import ckpt
    from ckpt.objectstore import ObjectPath

    for cut_short in ("a deletion", "a save"):
        ckpt.save(f"{bucket}/m", state(1))
        ObjectPath(f"{bucket}/m/manifest.json").unlink()  # what either leaves: ckpt's marker, no manifest
        if cut_short == "a save":
            ObjectPath(f"{bucket}/m/tree.json").unlink()
        ObjectPath(f"{bucket}/m2/notes").write_bytes(b"a user's")
        assert ckpt.delete(f"{bucket}/m", missing_ok=True) is True  # was: ForeignEntryError, 'not a committed step'
        assert ObjectPath(bucket).children() == ["m2"]


def test_s3_deleting_a_checkpoint_this_process_is_saving_waits_for_the_save_then_deletes_it_whole(bucket,
                                                                                                   monkeypatch):
    """Was: the deletion removed the objects the save had written (ckpt's marker among them), the save went on
    writing, failed, and left objects that ckpt.delete then refused to remove (NotACheckpointError)."""
    import ckpt
    from ckpt import saving, storage
    from ckpt.objectstore import ObjectPath

    waiting, go, make_temporary, hurry = threading.Event(), threading.Event(), storage.make_temporary, \
        saving.StepWriter.hurry
    delete_step = ckpt.checkpoint.root.delete_step

    def held(*args, **kwargs):  # the save has made its directory at the path, marked: it waits there
        made = make_temporary(*args, **kwargs)
        waiting.set()
        assert go.wait(60)
        return made

    def deleted(*args, **kwargs):  # (without the wait: the deletion runs meanwhile, then lets the save go on)
        try:
            return delete_step(*args, **kwargs)
        finally:
            go.set()

    monkeypatch.setattr(storage, "make_temporary", held)
    monkeypatch.setattr(saving.StepWriter, "hurry", lambda self: (go.set(), hurry(self)))
    monkeypatch.setattr(ckpt.checkpoint.root, "delete_step", deleted)
    response = ckpt.save_async(f"{bucket}/m", {"w": np.arange(300_000.0)})
    assert waiting.wait(60)
    assert ckpt.delete(f"{bucket}/m") is True
    assert response.result(timeout=60) is None
    assert not ObjectPath(f"{bucket}/m").exists() and ObjectPath(bucket).children() == []


def test_s3_a_checkpoint_or_root_inside_a_step_is_refused_before_anything_is_written(bucket):
    """Was: accepted (local paths were refused), and deleted with the step: ckpt.save(m, overwrite=True) removed
    m/inner, as garbage collection of step 5 would remove the root run/5/sub."""
    import ckpt
    from ckpt import errors
    from ckpt.objectstore import ObjectPath

    ckpt.save(f"{bucket}/m", state(1))
    for marked in (True, False):  # (without ckpt's marker: a step an earlier ckpt committed)
        if not marked:
            ObjectPath(f"{bucket}/m/.ckpt-owned").unlink()
        with pytest.raises(errors.RootDirectoryError, match=f"{bucket}/m cannot be the directory inner is saved in: it "
                                                            "is a checkpoint"):
            ckpt.save(f"{bucket}/m/inner", state(2))
    ObjectPath(f"{bucket}/elsewhere/manifest.json").write_text("{}")  # a user's, beside no tree.json: no step
    ckpt.save(f"{bucket}/elsewhere/inner", state(2))
    with Checkpointer(f"{bucket}/run") as ckptr:
        ckptr.save(5, state(5))
    with pytest.raises(errors.RootDirectoryError, match=f"{bucket}/run/5/sub cannot be a checkpoint root: it lies in "
                                                        f"{bucket}/run/5, which is a checkpoint"):
        Checkpointer(f"{bucket}/run/5/sub")
    assert "inner" not in ObjectPath(f"{bucket}/m").children() and "sub" not in ObjectPath(f"{bucket}/run/5").children()
    ObjectPath(f"{bucket}/run/5/manifest.json").unlink()  # what a save of step 5 killed before its commit leaves
    with pytest.raises(errors.RootDirectoryError, match=r"lies in .*/run/5, which is a checkpoint of ckpt's not "
                                                        r"committed \(ckpt's marker, no manifest: a save in progress"):
        Checkpointer(f"{bucket}/run/5/sub")  # was: 'which is a checkpoint (a step directory)'
