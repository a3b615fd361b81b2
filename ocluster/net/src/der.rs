//! Just enough DER to find a certificate's SubjectPublicKeyInfo, whose SHA-256 is a vat's
//! identity. Certificates come from the network, so every length is checked.

/// One TLV: (tag, contents, rest).
fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, b) = b.split_first()?;
    let (&first, mut b) = b.split_first()?;
    let len = if first < 0x80 {
        first as usize
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || b.len() < n {
            return None;
        }
        let mut len = 0usize;
        for &x in &b[..n] {
            len = (len << 8) | x as usize;
        }
        b = &b[n..];
        len
    };
    if b.len() < len {
        return None;
    }
    Some((tag, &b[..len], &b[len..]))
}

/// The whole TLV at the start of `b` (header included).
fn whole(b: &[u8]) -> Option<&[u8]> {
    let (_, _, rest) = tlv(b)?;
    Some(&b[..b.len() - rest.len()])
}

const SEQUENCE: u8 = 0x30;

/// The DER of the certificate's SubjectPublicKeyInfo.
pub fn spki_of_certificate(cert: &[u8]) -> Option<&[u8]> {
    let (tag, cert, _) = tlv(cert)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, mut tbs, _) = tlv(cert)?;
    if tag != SEQUENCE {
        return None;
    }
    // [0] EXPLICIT version, optional.
    if tbs.first() == Some(&0xa0) {
        tbs = tlv(tbs)?.2;
    }
    // serialNumber, signature, issuer, validity, subject.
    for _ in 0..5 {
        tbs = tlv(tbs)?.2;
    }
    let spki = whole(tbs)?;
    (spki[0] == SEQUENCE).then_some(spki)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_or_garbage_input_is_refused() {
        assert_eq!(spki_of_certificate(&[]), None);
        assert_eq!(spki_of_certificate(&[0x30]), None);
        assert_eq!(
            spki_of_certificate(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]),
            None
        );
        assert_eq!(spki_of_certificate(&[0x30, 0x02, 0x30, 0x00]), None);
        for n in 0..64 {
            let junk: Vec<u8> = (0..n).map(|i| (i * 37 + 11) as u8).collect();
            let _ = spki_of_certificate(&junk);
        }
    }
}
