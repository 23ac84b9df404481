"""Every Hugging Face Hub call of the project goes through here: a model (a hub id), a tokenizer, a corpus's or pair
source's parquet files, GLUE's files, MTEB's task data. A file already in the cache costs no request; otherwise one
short probe tells an unreachable hub at once, and the error is one line saying what to do offline (huggingface_hub
alone would retry for ~25 s and then print a traceback)."""

import logging
from contextlib import contextmanager

from config import UserError, one_line


def endpoint() -> str:
    from huggingface_hub import constants
    return constants.ENDPOINT


@contextmanager
def requests(what: str, offline: str, wrap: bool = False):
    """Around any huggingface_hub call (datasets' and mteb's too): when one of its requests fails and the hub does not
    answer one 5 s request either, stop at once with `cannot reach the Hugging Face Hub to <what> ...; offline:
    <offline>`. huggingface_hub logs each failed request before it retries; the check runs there. With `wrap`, any
    other failure is one line too: `cannot <what> from the Hugging Face Hub (...); offline: <offline>`."""
    from huggingface_hub.utils import get_session
    unreachable = []

    def check(record):
        if "thrown while requesting" in record.getMessage():
            try:
                get_session().head(endpoint(), timeout=5)  # any answer: reachable, let it retry
            except Exception as e:
                unreachable.append(f"cannot reach the Hugging Face Hub to {what} ({endpoint()}: {one_line(e)}); "
                                   f"offline: {offline}")
                raise UserError(unreachable[0]) from None
        return True
    log = logging.getLogger("huggingface_hub.utils._http")
    log.addFilter(check)
    try:
        yield
    except Exception as e:
        if unreachable:  # whatever the callers in between made of it
            raise UserError(unreachable[0]) from None
        if wrap and not isinstance(e, UserError):  # e.g. offline, unknown repo, gated
            raise UserError(f"cannot {what} from the Hugging Face Hub ({one_line(e)}); offline: {offline}") from None
        raise
    finally:
        log.removeFilter(check)


def download(repo: str, filename: str, *, what: str, offline: str, repo_type=None, revision=None,
             cache_dir=None) -> str:
    """The local path of one file of a hub repo: from the cache when it is there (no request), else after one probe
    of the file (5 s, no retries), downloaded. Any failure is one UserError line naming what and the offline way."""
    import huggingface_hub as hf
    where = dict(repo_type=repo_type, revision=revision, cache_dir=cache_dir)
    try:
        return hf.hf_hub_download(repo, filename, local_files_only=True, **where)
    except Exception:  # not cached (or offline mode without it): ask the hub
        pass
    with requests(what, offline, wrap=True):
        try:
            hf.get_hf_file_metadata(hf.hf_hub_url(repo, filename, repo_type=repo_type, revision=revision), timeout=5)
        except Exception as e:  # the hub answered no (not found, gated), or did not answer at all
            said = f"cannot {what} from the Hugging Face Hub" if getattr(e, "response", None) is not None else \
                f"cannot reach the Hugging Face Hub to {what}"
            raise UserError(f"{said} ({endpoint()}: {one_line(e)}); offline: {offline}") from None
        return hf.hf_hub_download(repo, filename, **where)


def list_files(repo: str, *, what: str, offline: str, repo_type=None, revision=None) -> list:
    """The file names of a hub repo (nothing downloaded)."""
    import huggingface_hub as hf
    with requests(what, offline):
        return hf.HfApi().list_repo_files(repo, repo_type=repo_type, revision=revision)


def snapshot(repo: str, patterns: list, *, what: str, offline: str, revision=None) -> str:
    """The local folder of a hub repo's files that match `patterns` (cached ones are not fetched again)."""
    import huggingface_hub as hf
    with requests(what, offline, wrap=True):
        return hf.snapshot_download(repo, revision=revision, allow_patterns=patterns)
