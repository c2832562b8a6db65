"""Languages of XTREME and XTREME-R: name, family and script (as the XTREME / XTREME-R papers list them),
and the codes the datasets use for them (Tatoeba's ISO 639-3 file names, the UD treebank names of the
`google/xtreme` udpos configs). The analysis view groups scores by family and script with this table."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Language:
    code: str  # ISO 639-1, as the benchmarks name their files
    name: str  # English name, also the `google/xtreme` udpos config suffix
    family: str  # genus for Indo-European, family otherwise
    script: str
    iso3: str = ""  # Tatoeba file code, where Tatoeba has the language


_TABLE = """
af Afrikaans       IE:Germanic      Latin       afr
ar Arabic          Afro-Asiatic     Arabic      ara
az Azerbaijani     Turkic           Latin       aze
bg Bulgarian       IE:Slavic        Cyrillic    bul
bn Bengali         IE:Indo-Aryan    Bengali     ben
de German          IE:Germanic      Latin       deu
el Greek           IE:Greek         Greek       ell
en English         IE:Germanic      Latin       eng
es Spanish         IE:Romance       Latin       spa
et Estonian        Uralic           Latin       est
eu Basque          Basque           Latin       eus
fa Persian         IE:Iranian       Arabic      pes
fi Finnish         Uralic           Latin       fin
fr French          IE:Romance       Latin       fra
gu Gujarati        IE:Indo-Aryan    Gujarati    -
he Hebrew          Afro-Asiatic     Hebrew      heb
hi Hindi           IE:Indo-Aryan    Devanagari  hin
ht Haitian_Creole  Creole           Latin       -
hu Hungarian       Uralic           Latin       hun
id Indonesian      Austronesian     Latin       ind
it Italian         IE:Romance       Latin       ita
ja Japanese        Japonic          Japanese    jpn
jv Javanese        Austronesian     Latin       jav
ka Georgian        Kartvelian       Georgian    kat
kk Kazakh          Turkic           Cyrillic    kaz
ko Korean          Koreanic         Hangul      kor
lt Lithuanian      IE:Baltic        Latin       lit
ml Malayalam       Dravidian        Malayalam   mal
mr Marathi         IE:Indo-Aryan    Devanagari  mar
ms Malay           Austronesian     Latin       -
my Burmese         Sino-Tibetan     Myanmar     -
nl Dutch           IE:Germanic      Latin       nld
pa Punjabi         IE:Indo-Aryan    Gurmukhi    -
pl Polish          IE:Slavic        Latin       pol
pt Portuguese      IE:Romance       Latin       por
qu Quechua         Quechuan         Latin       -
ro Romanian        IE:Romance       Latin       ron
ru Russian         IE:Slavic        Cyrillic    rus
sw Swahili         Niger-Congo      Latin       swh
ta Tamil           Dravidian        Tamil       tam
te Telugu          Dravidian        Telugu      tel
th Thai            Kra-Dai          Thai        tha
tl Tagalog         Austronesian     Latin       tgl
tr Turkish         Turkic           Latin       tur
uk Ukrainian       IE:Slavic        Cyrillic    ukr
ur Urdu            IE:Indo-Aryan    Arabic      urd
vi Vietnamese      Austroasiatic    Latin       vie
wo Wolof           Niger-Congo      Latin       -
yo Yoruba          Niger-Congo      Latin       -
zh Chinese         Sino-Tibetan     Han         cmn
"""

LANGUAGES: dict[str, Language] = {}
for _line in _TABLE.strip().splitlines():
    _code, _name, _family, _script, _iso3 = _line.split()
    LANGUAGES[_code] = Language(_code, _name.replace("_", " "), _family, _script, "" if _iso3 == "-" else _iso3)


def language(code: str) -> Language:
    """The table entry for `code`; an unknown code (e.g. a synthetic language) gets family/script "unknown"."""
    return LANGUAGES.get(code, Language(code, code, "unknown", "unknown"))


def iso3(code: str) -> str:
    """Tatoeba's three-letter code for an XTREME language code (deu for de, cmn for zh, ...)."""
    entry = LANGUAGES.get(code)
    if entry is None or not entry.iso3:
        raise ValueError(f"no Tatoeba code for language {code!r}")
    return entry.iso3
