"""The mapping file of `crm import` (services/importer/mapping.py)."""

from pathlib import Path

import pytest

from services.importer.mapping import MappingError, load
from services.importer.plan import plan

SECRET = b"test-identity-secret"  # the identity secret e-mails and phones are hashed under

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "import" / "mapping.toml"
HEAD = '[import]\nid = "t"\nas_of = 2025-01-01T00:00:00Z\ncurrency = "EUR"\n'
ORDERS = """
[orders]
file = "orders.csv"
[orders.columns]
order_id = "order"
customer_id = "customer"
occurred_at = "at"
sku = "sku"
category = "category"
quantity = "qty"
unit_price = "price"
"""


def mapping(tmp_path: Path, text: str, files: dict[str, str] | None = None) -> Path:
    default = {"orders.csv": "order,customer,at,sku,category,qty,price\n"}
    for name, content in (default if files is None else files).items():
        (tmp_path / name).write_text(content)
    path = tmp_path / "mapping.toml"
    path.write_text(text)
    return path


def refusal(path: Path) -> str:
    with pytest.raises(MappingError) as raised:
        load(path)
    return str(raised.value)


def test_the_documented_example_mapping_loads_with_every_file():
    loaded = load(EXAMPLE)
    assert loaded.import_id == "kaufhaus-2025"
    assert [source.name for source in loaded.sources] == [
        "customers.csv", "orders.csv", "refunds.csv", "points.csv", "reviews.jsonl"]
    assert loaded.currencies == {"EUR", "CHF"}
    assert loaded.as_of.isoformat() == "2025-01-01T00:00:00+01:00"


def test_an_unknown_field_is_refused_with_the_fields_the_kind_knows(tmp_path):
    message = refusal(mapping(tmp_path, HEAD + ORDERS + 'qty = "qty"\n'))
    assert "unknown field(s) qty" in message and "quantity" in message


def test_a_kind_without_a_column_or_default_for_a_required_field_is_refused(tmp_path):
    message = refusal(mapping(tmp_path, HEAD + ORDERS.replace('category = "category"\n', "")))
    assert "no column or default for category" in message


def test_a_default_stands_in_for_a_missing_column(tmp_path):
    text = HEAD + ORDERS.replace('category = "category"\n', "") + '[orders.defaults]\ncategory = "general"\n'
    assert load(mapping(tmp_path, text)).sources[0].spec.defaults == {"category": "general"}


def test_a_file_that_names_no_customer_is_refused(tmp_path):
    assert "name the customer" in refusal(mapping(tmp_path, HEAD + ORDERS.replace('customer_id = "customer"\n', "")))


def test_a_missing_file_is_refused(tmp_path):
    assert "no such file" in refusal(mapping(tmp_path, HEAD + ORDERS, files={}))


def test_an_unknown_timezone_or_a_bad_import_id_is_refused(tmp_path):
    assert "timezone" in refusal(mapping(tmp_path, HEAD.replace('currency', 'timezone = "Mars/Base"\ncurrency')
                                         + ORDERS))
    assert "id" in refusal(mapping(tmp_path, HEAD.replace('"t"', '"../etc"') + ORDERS))


def test_an_events_entry_needs_a_catalog_type_and_a_name_of_its_own(tmp_path):
    entry = '\n[[events]]\ntype = "{type}"\nname = "{name}"\nfile = "orders.csv"\nkey = "order"\n' \
            '[events.columns]\ncustomer_id = "customer"\noccurred_at = "at"\n'
    assert "not in the event catalog" in refusal(mapping(tmp_path, HEAD + entry.format(type="tea_poured", name="x")))
    assert "kind of its own" in refusal(mapping(tmp_path, HEAD + entry.format(type="review_posted", name="orders")))


def test_files_take_the_import_formats_unless_they_set_their_own(tmp_path):
    text = HEAD.replace("currency", 'decimal_separator = ","\ndelimiter = ";"\ncurrency') + ORDERS + \
        '[refunds]\nfile = "refunds.csv"\ndecimal_separator = "."\ndelimiter = ","\n[refunds.columns]\n' \
        'refund_id = "r"\norder_id = "o"\ncustomer_id = "c"\noccurred_at = "at"\namount = "a"\n'
    loaded = load(mapping(tmp_path, text, {"orders.csv": "", "refunds.csv": ""}))
    orders, refunds = loaded.sources
    assert (orders.formats.decimal_separator, orders.delimiter) == (",", ";")
    assert (refunds.formats.decimal_separator, refunds.delimiter) == (".", ",")


def test_a_glob_reads_every_matching_file_in_name_order(tmp_path):
    header = "order,customer,at,sku,category,qty,price\n"
    path = mapping(tmp_path, HEAD + ORDERS.replace("orders.csv", "orders-*.csv"),
                   {"orders-2016.csv": header, "orders-2015.csv": header})
    assert [source.name for source in load(path).sources] == ["orders-2015.csv", "orders-2016.csv"]


def test_a_column_the_file_lacks_stops_the_import_before_anything_is_built(tmp_path):
    path = mapping(tmp_path, HEAD + ORDERS, {"orders.csv": "order,customer,at,sku,category,price\n"})
    with pytest.raises(MappingError, match="no column 'qty'"):
        plan(load(path), "DE", SECRET)
