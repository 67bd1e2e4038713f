-- Autonomous-system ranges, imported from the public iptoasn
-- `ip2asn-combined.tsv` by `fleetban-server asn import FILE`. An import
-- replaces the whole table. Lookups take the range with the greatest start at
-- or below an address and check its end.

create table asn_ranges (
    range_start inet primary key,
    range_end inet not null,
    asn bigint not null,
    country text not null,
    name text not null,
    check (family(range_start) = family(range_end) and range_start <= range_end)
);
