import gzip
import shutil
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"

# MovieLens-1M in RecBole's typed TSV, written by hand (the item file has CRLF line ends like the real one).
# Ties: 1m_1 rated Heat and Toy Story in the same second; input order must be kept.
ML_ITEMS = ("item_id:token\tmovie_title:token\trelease_year:float\tgenre:token\r\n"
            "Toy Story (1995)\tToy Story\t1995\tAnimation Children's Comedy\r\n"
            "Heat (1995)\tHeat\t1995\tAction Crime Thriller\r\n"
            "Casino (1995)\tCasino\t1995\tDrama Thriller\r\n"
            "Babe (1995)\tBabe\t1995\tChildren's Comedy Drama\r\n")
ML_INTER = ("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
            "1m_1\tHeat (1995)\t5\t978300760\n"
            "1m_1\tToy Story (1995)\t3\t978300760\n"
            "1m_1\tBabe (1995)\t4\t978300100\n"
            "1m_2\tCasino (1995)\t4\t978298709\n"
            "1m_2\tHeat (1995)\t2\t978299000\n")


@pytest.fixture
def ml_dir(tmp_path):
    root = tmp_path / "ml-1m"
    root.mkdir()
    (root / "ml-1m.item").write_bytes(ML_ITEMS.encode())
    (root / "ml-1m.inter").write_bytes(ML_INTER.encode())
    return root


def gzip_copy(src: Path, dst_dir: Path) -> Path:
    dst_dir.mkdir(parents=True, exist_ok=True)
    dst = dst_dir / (src.name + ".gz")
    with open(src, "rb") as fin, gzip.open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout)
    return dst


@pytest.fixture
def fixtures():
    return FIXTURES
