//! Tests of the ASN/country policy; see `super`.
