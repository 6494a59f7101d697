"""search/QUERY: ranked vault hits (`SCORE PATH:LINE snippet`), kept up to date with
the vault's backing directory, persisted across mounts, and filtered by views."""
import os
import time

import pytest

from conftest import WAIT_S

A = "# Orchards\n\nNotes on trees.\nThe orchard grows red apples in autumn.\nPears too.\n"
B = "Bananas are yellow.\nApples appear once here.\n"


def hits(mount, query: str, root: str = "") -> list[str]:
    return mount.read(f"{root}search/{query}").splitlines()


def ready(mount) -> dict[str, str]:
    status = mount.wait_for(lambda: "ready=yes" in (s := mount.read("search/status")) and s,
                            timeout=60, what="the search index")
    return dict(line.split("=", 1) for line in status.splitlines())


def poll(mount, query: str, predicate, timeout: float = WAIT_S) -> float:
    """Seconds until predicate(hits) holds (at most timeout, else the assertion). A change
    is searchable within a second on a quiet machine; the bound is generous for a loaded one."""
    t0 = time.monotonic()
    mount.wait_for(lambda: predicate(hits(mount, query)), timeout=timeout,
                   what=f"search/{query} to change")
    return time.monotonic() - t0


def test_ranked_hits_lines_snippets_edits_and_deletes(mount):
    (mount.vault / "docs").mkdir()
    (mount.vault / "docs" / "a.md").write_text(A)
    (mount.vault / "docs" / "b.md").write_text(B)
    (mount.vault / ".git").mkdir()
    (mount.vault / ".git" / "x").write_text("red apples orchard\n")  # never indexed
    ready(mount)
    poll(mount, "red apples", lambda h: len(h) == 2)
    first, second = hits(mount, "red apples")
    score, where, snippet = first.split(" ", 2)
    assert where == "vault/docs/a.md:4" and snippet == "The orchard grows red apples in autumn."
    assert float(score) > float(second.split()[0]) > 0
    assert second.split()[1] == "vault/docs/b.md:2"
    assert hits(mount, "the") == []  # stop words only: nothing to rank
    assert "status" in os.listdir(mount.path / "search")

    # an edit made behind fs9's back is searchable within a second
    with open(mount.vault / "docs" / "b.md", "a") as f:
        f.write("A quokka smiles.\n")
    poll(mount, "quokka", lambda h: [x.split(" ", 2)[1] for x in h] == ["vault/docs/b.md:3"])
    # ... and a deleted file leaves the results within a second
    (mount.vault / "docs" / "a.md").unlink()
    poll(mount, "red apples", lambda h: [x.split()[1] for x in h] == ["vault/docs/b.md:2"])
    # a rename moves the hit
    os.rename(mount.vault / "docs" / "b.md", mount.vault / "docs" / "c.md")
    poll(mount, "quokka", lambda h: [x.split()[1] for x in h] == ["vault/docs/c.md:3"])


def test_restart_reads_only_changed_files(mount):
    for i in range(5):
        (mount.vault / f"n{i}.md").write_text(f"note {i} about gardens\n")
    ready(mount)
    poll(mount, "gardens", lambda h: len(h) == 5)
    mount.umount()
    (mount.vault / "n0.md").write_text("note 0 about meadows now\n")
    (mount.vault / "n1.md").unlink()
    mount.mount()
    status = ready(mount)
    assert (status["read"], status["unchanged"], status["removed"]) == ("1", "3", "1")
    assert [h.split()[1] for h in hits(mount, "meadows")] == ["vault/n0.md:1"]
    assert len(hits(mount, "gardens")) == 3


def test_an_agent_finds_only_what_its_view_shows(mount):
    (mount.vault / "docs").mkdir()
    (mount.vault / "secret").mkdir()
    (mount.vault / "docs" / "pub.md").write_text("zanzibar harbour schedule\n")
    (mount.vault / "secret" / "s.md").write_text("zanzibar plans\nthe word is xylograph\n")
    mount.define("reader", 'cmd = ["cat"]\nunconfined = true\npledge = ["read"]\n'
                           '[unveil]\n"vault/docs" = "r"\n"search" = "r"\n')
    mount.define("blind", 'cmd = ["cat"]\nunconfined = true\npledge = ["send"]\n'
                          '[unveil]\n"vault/docs" = "r"\n"search" = "r"\n')
    mount.sh("echo 'spawn reader' > ctl && echo 'spawn blind' > ctl", check=True)
    ready(mount)
    poll(mount, "zanzibar xylograph", lambda h: len(h) == 2)
    assert hits(mount, "zanzibar xylograph")[0].split()[1] == "vault/secret/s.md:2"
    view = "agents/reader/view/"
    assert [h.split()[1] for h in hits(mount, "zanzibar xylograph", view)] == \
        ["vault/docs/pub.md:1"]
    assert hits(mount, "xylograph", view) == []  # not a snippet, not a count
    assert "docs=1\n" in mount.read(f"{view}search/status")  # nor how many are hidden
    # scores come from what the view sees: the hidden file does not change them
    alone = hits(mount, "zanzibar", view)[0].split()[0]
    (mount.vault / "secret" / "t.md").write_text("zanzibar zanzibar\n")
    poll(mount, "zanzibar", lambda h: len(h) == 3)
    assert hits(mount, "zanzibar", view)[0].split()[0] == alone
    # searching needs the read pledge; without "search" unveiled it is absent
    with pytest.raises(PermissionError):
        mount.read("agents/blind/view/search/zanzibar")
    mount.define("nosearch", 'cmd = ["cat"]\nunconfined = true\n[unveil]\n"vault/docs" = "r"\n')
    mount.sh("echo 'spawn nosearch' > ctl", check=True)
    with pytest.raises(FileNotFoundError):
        mount.read("agents/nosearch/view/search/zanzibar")


def test_unavailable_embedding_model_says_so_and_falls_back(mount):
    (mount.vault / "a.md").write_text("lighthouse keeper\n")
    mount.umount()
    (mount.state / "search.toml").write_text('embed = "huggingface:BAAI/bge-small-en-v1.5"\n')
    mount.mount()
    status = ready(mount)
    assert status["ranking"] == "bm25" and "not installed" in status["embed_error"]
    poll(mount, "lighthouse", lambda h: len(h) == 2)
    note, hit = hits(mount, "lighthouse")
    assert note.startswith("fs9: embedding model huggingface:BAAI/bge-small-en-v1.5 is not "
                           "available (llama-index-embeddings-huggingface is not installed)")
    assert hit.split()[1] == "vault/a.md:1"
    assert '"search_fallback"' in mount.read("log/audit")
