//! Unit tests of the NF4 format: thresholds, dynamic map, quantization rules, torch sums, bnb blobs.

use super::*;

#[test]
#[allow(clippy::excessive_precision)] // decimal printouts of the f32 literals
fn thresholds_equal_the_cuda_literals() {
    // The literals of bitsandbytes' CUDA dQuantizeNF4 tree, as f32.
    let cuda: [f32; 15] = [
        -0.848_096_370_697_021_5,
        -0.610_632_896_423_339_8,
        -0.459_995_269_775_390_6,
        -0.339_679_419_994_354_25,
        -0.234_607_398_509_979_25,
        -0.137_911_736_965_179_44,
        -0.045_525_018_125_772_476,
        0.039_790_149_778_127_67,
        0.120_255_246_758_461,
        0.203_521_251_678_466_8,
        0.292_013_764_381_408_7,
        0.389_312_535_524_368_3,
        0.501_663_446_426_391_6,
        0.642_786_920_070_648_2,
        0.861_478_447_914_123_5,
    ];
    for i in 0..15 {
        assert_eq!(
            NF4_THRESHOLDS[i].to_bits(),
            cuda[i].to_bits(),
            "threshold {i}"
        );
    }
}

#[test]
fn ties_go_to_the_lower_code_and_packing_is_high_nibble_first() {
    for (i, &t) in NF4_THRESHOLDS.iter().enumerate() {
        assert_eq!(nf4_code_of(t) as usize, i, "exact tie at threshold {i}");
        assert_eq!(
            nf4_code_of(f32::from_bits(t.to_bits() + 1).max(t.next_up())) as usize,
            i + 1
        );
    }
    // Block [1.0, -1.0, 0, ...]: absmax 1; codes 15, 0, then 7s.
    let mut x = vec![0.0f32; 64];
    x[0] = 1.0;
    x[1] = -1.0;
    let q = quantize(&x, &[64], false).unwrap();
    assert_eq!(q.packed[0], 0xF0);
    assert!(q.packed[1..].iter().all(|&b| b == 0x77));
    assert_eq!(q.absmax, Absmax::Plain(vec![1.0]));
}

#[test]
fn dynamic8_picks_the_nearest_code_away_from_ties() {
    let map = dynamic_map();
    // Every code value maps to itself, and a value a hair above/below stays there.
    for (c, &v) in map.iter().enumerate() {
        assert_eq!(quantize_dynamic8(&map, v) as usize, c, "code {c} = {v}");
    }
    assert_eq!(quantize_dynamic8(&map, 1.5), 255);
    assert_eq!(quantize_dynamic8(&map, -1.5), 0);
    assert_eq!(quantize_dynamic8(&map, f32::NAN), 0);
}

#[test]
fn dynamic8_is_nearest_up_to_midpoint_rounding() {
    // Sweep [-1.2, 1.2]: the chosen code must be a nearest one, except when x lies within one f32 ulp
    // of the midpoint between two codes (where the f32-rounded midpoint decides, as on the GPU).
    let map = dynamic_map();
    let n = 200_000;
    for i in 0..=n {
        let x = -1.2f32 + 2.4 * (i as f32 / n as f32);
        let q = quantize_dynamic8(&map, x) as usize;
        let d = |c: usize| (x as f64 - map[c] as f64).abs();
        let best = (0..256).map(d).fold(f64::INFINITY, f64::min);
        if d(q) > best {
            let nearest = (0..256).find(|&c| d(c) == best).unwrap();
            let mid = (map[q] as f64 + map[nearest] as f64) / 2.0;
            let ulp = (x.next_up() - x) as f64;
            assert!(
                (x as f64 - mid).abs() <= ulp,
                "x = {x}: code {q} ({}) but {nearest} ({}) is nearer",
                map[q],
                map[nearest]
            );
        }
    }
}

#[test]
fn torch_sum_handles_every_small_length() {
    // Exactly representable values: the cascade order cannot change the result, so compare with f64.
    for n in 0..300usize {
        let x: Vec<f32> = (0..n).map(|i| (i % 7) as f32 * 0.25).collect();
        let exact: f64 = x.iter().map(|&v| v as f64).sum();
        assert_eq!(torch_sum_f32(&x) as f64, exact, "n = {n}");
    }
}

#[test]
fn python_repr_matches_python() {
    let cases: [(f64, &str); 12] = [
        (0.031807661056518555, "0.031807661056518555"),
        (1e-05, "1e-05"),
        (0.0001, "0.0001"),
        (1.5e-7, "1.5e-07"),
        (1e16, "1e+16"),
        (1234567890123456.0, "1234567890123456.0"),
        (2.0, "2.0"),
        (627.4757690429688, "627.4757690429688"),
        (-3.25, "-3.25"),
        (0.0, "0.0"),
        (1.2345e20, "1.2345e+20"),
        (f64::INFINITY, "Infinity"),
    ];
    for (v, want) in cases {
        assert_eq!(python_float_repr(v), want);
    }
}

#[test]
fn bad_inputs_are_typed_errors() {
    let e = quantize(&[1.0; 10], &[3, 4], false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("nf4_quantize") && e.contains("data") && e.contains("12"),
        "{e}"
    );
    let e = quantize(&[], &[0, 4], false).unwrap_err().to_string();
    assert!(e.contains("no elements"), "{e}");
    let e = quantize(&[1.0, f32::NAN], &[2], true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("element 1"), "{e}");
    let e = quantize(&[1.0], &[usize::MAX, 2], true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("overflows"), "{e}");

    let q = quantize(&[0.5f32; 130], &[130], true).unwrap();
    let e = q
        .dequantize_into(usize::MAX, &mut [0.0; 2])
        .unwrap_err()
        .to_string();
    assert!(e.contains("nf4_dequantize") && e.contains("range"), "{e}");
    let Absmax::Nested {
        codes,
        nested_absmax,
        offset,
        code8,
    } = &q.absmax
    else {
        panic!("nested expected")
    };
    let ok = Nf4Tensor::from_bnb_parts(
        &[130],
        &q.packed,
        BnbAbsmax::U8(codes),
        &NF4_CODE,
        Some(nested_absmax),
        Some(&code8[..]),
        Some(*offset),
    )
    .unwrap();
    assert_eq!(ok, q);
    let bad = |r: crate::Result<Nf4Tensor>, what: &str| {
        let e = r.unwrap_err().to_string();
        assert!(e.contains(what), "expected `{what}` in: {e}");
    };
    bad(
        Nf4Tensor::from_bnb_parts(
            &[130],
            &q.packed[1..],
            BnbAbsmax::U8(codes),
            &NF4_CODE,
            Some(nested_absmax),
            Some(&code8[..]),
            Some(*offset),
        ),
        "weight (packed)",
    );
    bad(
        Nf4Tensor::from_bnb_parts(
            &[130],
            &q.packed,
            BnbAbsmax::U8(&codes[1..]),
            &NF4_CODE,
            Some(nested_absmax),
            Some(&code8[..]),
            Some(*offset),
        ),
        "weight.absmax",
    );
    let mut fp4 = NF4_CODE;
    fp4[3] = 0.25;
    bad(
        Nf4Tensor::from_bnb_parts(
            &[130],
            &q.packed,
            BnbAbsmax::U8(codes),
            &fp4,
            Some(nested_absmax),
            Some(&code8[..]),
            Some(*offset),
        ),
        "weight.quant_map",
    );
    bad(
        Nf4Tensor::from_bnb_parts(
            &[130],
            &q.packed,
            BnbAbsmax::U8(codes),
            &NF4_CODE[..15],
            Some(nested_absmax),
            Some(&code8[..]),
            Some(*offset),
        ),
        "weight.quant_map",
    );
    bad(
        Nf4Tensor::from_bnb_parts(
            &[130],
            &q.packed,
            BnbAbsmax::U8(codes),
            &NF4_CODE,
            None,
            Some(&code8[..]),
            Some(*offset),
        ),
        "weight.nested_absmax",
    );
    bad(
        Nf4Tensor::from_bnb_parts(
            &[130],
            &q.packed,
            BnbAbsmax::U8(codes),
            &NF4_CODE,
            Some(&[1.0, 2.0]),
            Some(&code8[..]),
            Some(*offset),
        ),
        "weight.nested_absmax",
    );
    bad(
        Nf4Tensor::from_bnb_parts(
            &[130],
            &q.packed,
            BnbAbsmax::U8(codes),
            &NF4_CODE,
            Some(nested_absmax),
            Some(&code8[..255]),
            Some(*offset),
        ),
        "weight.nested_quant_map",
    );
    bad(
        Nf4Tensor::from_bnb_parts(
            &[130],
            &q.packed,
            BnbAbsmax::U8(codes),
            &NF4_CODE,
            Some(nested_absmax),
            Some(&code8[..]),
            None,
        ),
        "nested_offset",
    );
    bad(
        Nf4Tensor::from_bnb_parts(
            &[130],
            &q.packed,
            BnbAbsmax::U8(codes),
            &NF4_CODE,
            Some(nested_absmax),
            Some(&code8[..]),
            Some(f32::NAN),
        ),
        "nested_offset",
    );
    bad(
        Nf4Tensor::from_bnb_parts(
            &[130],
            &q.packed,
            BnbAbsmax::F32(&[1.0; 3]),
            &NF4_CODE,
            Some(nested_absmax),
            None,
            None,
        ),
        "nested parts given",
    );
    bad(
        Nf4Tensor::from_bnb_parts(
            &[130],
            &q.packed,
            BnbAbsmax::F32(&[1.0; 2]),
            &NF4_CODE,
            None,
            None,
            None,
        ),
        "weight.absmax",
    );
    bad(
        Nf4Tensor::from_bnb_parts(&[0], &[], BnbAbsmax::F32(&[]), &NF4_CODE, None, None, None),
        "no elements",
    );
}
