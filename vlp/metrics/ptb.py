"""PTB tokenisation as the MS-COCO caption toolkit applies it, in pure Python.

The toolkit runs Stanford PTBTokenizer 3.4.1 (`-preserveLines -lowerCase`) and then drops
punctuation tokens. This reproduces that output for English captions: clitics split off
(`'s`, `n't`, `'re`, ...), acronyms and common abbreviations keep their periods, numbers keep
their separators (`5:30`, `1,000`, `2.5`), brackets become `-lrb-` etc. (kept, because the
toolkit's drop list is upper-case), and `gonna`/`cannot` split as PTB does. Checked against
the Java tokenizer on every caption of the conformance set plus ~120 edge cases; one known
difference: Stanford keeps some g-dropped words (`Dunkin'`) whole, here the quote splits off.
"""

from __future__ import annotations

import re

# The toolkit's drop list (pycocoevalcap PTBTokenizer.PUNCTUATIONS); brackets are listed
# upper-case but tokens are lower-cased first, so `-lrb-` & co. survive.
DROPPED = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-"]
    + [".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
_RENAMED = {
    '"': "''",
    "(": "-lrb-",
    ")": "-rrb-",
    "[": "-lsb-",
    "]": "-rsb-",
    "{": "-lcb-",
    "}": "-rcb-",
}
_SPLIT_WORDS = {"gonna": ("gon", "na"), "wanna": ("wan", "na"), "gotta": ("got", "ta")}
_SPLIT_WORDS["cannot"] = ("can", "not")
_UNICODE = str.maketrans(
    {"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"', "\u2014": "--", "\u2013": "--"}
)
# Stanford keeps the period of these abbreviations.
_ABBREVIATIONS = (
    "mr|mrs|ms|messrs|dr|drs|prof|st|ste|ave|blvd|rd|jr|sr|inc|co|corp|ltd|dept|univ|vs|etc"
    "|ca|mt|ft|sq|gen|col|lt|sgt|capt|rev|sen|rep|gov|jan|feb|aug|sept|oct|nov|dec"
)
_PIECE = re.compile(
    rf"""
    <[^<>\s]+>                                   # SGML-ish tag, kept whole
    | [:;]-?[()dp](?=\s|$)                       # emoticon: :) -> :-rrb-
    | \#[^\W\d_]+                                 # hashtag (but # 12)
    | \d+\ \d+/\d+(?!\w)                           # mixed fraction, joined by a no-break space
    | (?:[^\W\d_]\.){{2,}}                       # acronym: u.s.a. e.g. p.m.
    | (?<!\w)[^\W\d_]\.(?!\w)                    # initial: j. smith, vitamin c.
    | (?<!\w)(?:{_ABBREVIATIONS})\.(?!\w)        # abbreviation: mr. st.
    | (?<!\w)nos?\.(?=\s+\d)                      # no. 5
    | \w+\.(?=[,;:])                              # period before in-sentence punctuation
    | \w+(?:[.@]\w+)+                            # dotted word / number: 2.5 www.x.com a@b.c
    | \d+(?:[,:]\d+)+                            # number with separators: 1,000 5:30
    | y'(?=all)                                  # y'all -> y' all
    | 't(?=is|was)                               # 'tis -> 't is
    | 'n'                                        # rock'n'roll
    | '(?:s|re|ve|ll|d|m)(?!\w)                  # clitic
    | n't(?!\w)                                  # negation clitic
    | (?<!\w)[^\W\d_]'(?!(?:s|re|ve|ll|d|m)(?!\w))[^\W\d_]\w*   # o'clock
    | \w+?(?=n't(?!\w))                          # stem before n't: do|n't, ca|n't
    | (?-i:[A-Z]+&[A-Z]+)                          # company: AT&T (but at & t)
    | \w+(?:[-/]\w+)*                            # word: t-shirt, 1/2-inch, and/or
    | \.\.\.|--|[!?]+|``|''                      # multi-character punctuation
    | \S                                         # any other symbol, alone
    """,
    re.VERBOSE | re.IGNORECASE,
)


def ptb_tokenize(text: str) -> list[str]:
    """Lower-cased PTB tokens of `text`, punctuation tokens kept (the toolkit's raw output)."""
    tokens: list[str] = []
    for piece in _PIECE.findall(text.translate(_UNICODE)):
        piece = piece.lower().replace(" ", "\u00a0")
        if piece[0] in ":;" and len(piece) > 1:
            piece = piece.replace("(", "-lrb-").replace(")", "-rrb-")
        if piece in _SPLIT_WORDS:
            tokens.extend(_SPLIT_WORDS[piece])
        else:
            tokens.append(_RENAMED.get(piece, piece))
    return tokens


def tokenize_caption(text: str) -> str:
    """A caption as the COCO toolkit scores it: PTB tokens, lower-cased, punctuation dropped."""
    return " ".join(t for t in ptb_tokenize(text) if t not in DROPPED)
