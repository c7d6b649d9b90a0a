from collections.abc import Iterator

import pytest

from protocols import _xmpp_relay


@pytest.fixture(autouse=True, scope="module")
def _fixed_stream_ids() -> Iterator[None]:
    """The proxy's XMPP stream ids are random; in the tests they are all ``ID``."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_xmpp_relay, "new_stream_id", lambda: "ID")
        yield
