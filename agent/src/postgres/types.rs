//! PostgreSQL types for masking: what a type OID allows, and the binary
//! wire format of the values cordon produces or has to read.

use crate::pipeline::mask::ValueType;

/// The value type of a column, from its type OID and typmod.
pub fn value_type(oid: u32, typmod: i32) -> ValueType {
    let len = (typmod >= 4).then(|| (typmod - 4) as usize);
    match oid {
        25 | 19 | 18 => ValueType::Text { max_chars: if oid == 18 { Some(1) } else { None }, fixed: false },
        1043 => ValueType::Text { max_chars: len, fixed: false },
        1042 => ValueType::Text { max_chars: len, fixed: true },
        16 => ValueType::Bool,
        17 => ValueType::Bytea,
        20 => ValueType::Int8,
        21 => ValueType::Int2,
        23 | 26 => ValueType::Int4,
        700 | 701 => ValueType::Float,
        1700 => ValueType::Numeric,
        1082 => ValueType::Date,
        1083 => ValueType::Time,
        1114 => ValueType::Timestamp,
        1184 => ValueType::TimestampTz,
        2950 => ValueType::Uuid,
        114 | 3802 => ValueType::Json,
        869 => ValueType::Inet,
        _ => ValueType::Other,
    }
}

/// A binary-format value as text, for the types cordon masks by content.
/// None: cordon does not read this type's binary form.
pub fn binary_to_text(oid: u32, v: &[u8]) -> Option<String> {
    Some(match oid {
        25 | 19 | 18 | 1043 | 1042 | 114 => String::from_utf8(v.to_vec()).ok()?,
        3802 => String::from_utf8(v.get(1..)?.to_vec()).ok()?,
        21 => i16::from_be_bytes(v.try_into().ok()?).to_string(),
        23 | 26 => i32::from_be_bytes(v.try_into().ok()?).to_string(),
        20 => i64::from_be_bytes(v.try_into().ok()?).to_string(),
        2950 => {
            let h = hex::encode(v);
            if h.len() != 32 {
                return None;
            }
            format!("{}-{}-{}-{}-{}", h.get(0..8)?, h.get(8..12)?, h.get(12..16)?, h.get(16..20)?, h.get(20..32)?)
        }
        _ => return None,
    })
}

/// The binary form of a masked value (the text `mask` produced).
/// None: cordon cannot write this type's binary form.
pub fn text_to_binary(oid: u32, text: &str) -> Option<Vec<u8>> {
    Some(match oid {
        25 | 19 | 18 | 1043 | 1042 | 114 => text.as_bytes().to_vec(),
        3802 => {
            let mut v = vec![1u8];
            v.extend_from_slice(text.as_bytes());
            v
        }
        16 => vec![u8::from(text == "t")],
        17 => Vec::new(),
        21 => text.parse::<i16>().ok()?.to_be_bytes().to_vec(),
        23 | 26 => text.parse::<i32>().ok()?.to_be_bytes().to_vec(),
        20 => text.parse::<i64>().ok()?.to_be_bytes().to_vec(),
        700 => text.parse::<f32>().ok()?.to_bits().to_be_bytes().to_vec(),
        701 => text.parse::<f64>().ok()?.to_bits().to_be_bytes().to_vec(),
        // numeric: only the zero constant (ndigits 0, weight 0, positive, scale 0).
        1700 if text == "0" => vec![0; 8],
        // date: days since 2000-01-01; the constant is 1970-01-01.
        1082 if text == "1970-01-01" => (-10_957i32).to_be_bytes().to_vec(),
        1083 if text == "00:00:00" => 0i64.to_be_bytes().to_vec(),
        // timestamps: microseconds since 2000-01-01.
        1114 | 1184 if text.starts_with("1970-01-01 00:00:00") => (-946_684_800_000_000i64).to_be_bytes().to_vec(),
        2950 => hex::decode(text.replace('-', "")).ok().filter(|b| b.len() == 16)?,
        // inet 0.0.0.0/32: family, bits, is_cidr, length, address.
        869 if text == "0.0.0.0" => vec![2, 32, 0, 4, 0, 0, 0, 0],
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_and_round_trips() {
        assert_eq!(value_type(1043, 12), ValueType::Text { max_chars: Some(8), fixed: false });
        assert_eq!(value_type(1043, -1), ValueType::Text { max_chars: None, fixed: false });
        assert_eq!(value_type(600, -1), ValueType::Other);
        assert_eq!(binary_to_text(23, &42i32.to_be_bytes()).as_deref(), Some("42"));
        assert_eq!(binary_to_text(23, &[1, 2]), None);
        assert_eq!(text_to_binary(20, "0"), Some(vec![0; 8]));
        assert_eq!(text_to_binary(1700, "12"), None);
        let u = "00000000-0000-0000-0000-000000000001";
        assert_eq!(binary_to_text(2950, &text_to_binary(2950, u).unwrap_or_default()).as_deref(), Some(u));
    }
}
