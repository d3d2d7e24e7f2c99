//! The vocabulary read from PostgreSQL: each enum whose words the schema
//! stores in a `text` column decodes from it, so a row carries the enum,
//! never the string, and an unknown word is a decoding error that names
//! the type.

use diesel::deserialize::{self, FromSql};
use diesel::pg::{Pg, PgValue};
use diesel::sql_types::Text;

use crate::mapping::{Direction, Policy};
use crate::model::{DeadLetterKind, Op, Origin};
use crate::policy::{ConflictStatus, ResolvedBy, Side};

macro_rules! from_text {
    ($($ty:ty => $parse:expr),* $(,)?) => {
        $(
            impl FromSql<Text, Pg> for $ty {
                fn from_sql(value: PgValue<'_>) -> deserialize::Result<Self> {
                    let word = std::str::from_utf8(value.as_bytes())?;
                    let parse: fn(&str) -> Option<$ty> = $parse;
                    parse(word).ok_or_else(|| {
                        format!("{word:?} is not a {}", stringify!($ty)).into()
                    })
                }
            }
        )*
    };
}

from_text! {
    Op => Op::parse,
    Origin => Origin::parse,
    Side => Side::parse,
    Policy => |s| s.parse().ok(),
    Direction => Direction::parse,
    ConflictStatus => ConflictStatus::parse,
    ResolvedBy => ResolvedBy::parse,
    DeadLetterKind => DeadLetterKind::parse,
}
