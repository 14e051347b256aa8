import pytest

from onegpu.engine.stopping import StopMatcher, cut_pieces


@pytest.mark.parametrize(
    ("hard", "soft", "text", "since", "expected"),
    [
        ((), (), "anything\n\n", 0, None),
        (("###",), (), "summary ###", 0, 8),
        (("###",), (), "summary ##", 0, None),
        (("\n\n",), (), " 42.\n\nQ:", 0, 4),  # inside what Qwen merges into one ".\n\n" token
        (("\n\n", "###"), (), "a ### b\n\n", 0, 2),  # earliest of several
        (("Question",), (), "B Question", 9, 2),  # a match that ends after `since` is found
        (("ab",), (), "ab xx ab", 8, None),  # only the new tail is searched
        ((), ("\n\n",), " B\n\nQuestion: ...", 0, 2),
        ((), ("\n\n",), "\n\n B\n\nQuestion", 0, 4),  # a leading blank line is not a cut
        ((), ("\n\n",), "  \n\n", 0, None),
        (("\n\n",), (), "\n\n B", 0, 0),  # hard stops match anywhere
    ],
)
def test_find(hard, soft, text, since, expected):
    assert StopMatcher(hard=hard, soft=soft).find(text, since) == expected


def test_stop_spanning_pieces_is_found_as_text_grows():
    matcher = StopMatcher(hard=("###",))
    text = ""
    found = None
    for piece in [" answer", " ##", "#", " more"]:
        since = len(text)
        text += piece
        if (found := matcher.find(text, since)) is not None:
            break
    assert (text, found) == (" answer ###", 8)


@pytest.mark.parametrize(
    ("pieces", "end", "expected"),
    [
        ([" B", ".\n\n", "Question"], 3, [" B", "."]),  # stop inside a merged token
        ([" B", "\n\n", "Q"], 2, [" B"]),  # a token made only of the stop is dropped
        ([" answer", " is", " ##", "#"], 11, [" answer", " is", " "]),  # spans two tokens
        (["a", "", "", "😀\n\n"], 2, ["a", "", "", "😀"]),  # held-back bytes stay with their char
        (["a", "", "😀"], 1, ["a"]),  # bytes of a character inside the stop go with it
        (["abc"], 0, []),
        (["ab", "cd"], 4, ["ab", "cd"]),
    ],
)
def test_cut_pieces(pieces, end, expected):
    kept = cut_pieces(pieces, end)
    assert kept == expected
    assert "".join(kept) == "".join(pieces)[:end]
