//! Text as the original prints it with OCaml's `Format`: vertical boxes (`registered:`
//! then one indented line per worker) and horizontal-or-vertical boxes that fill lines
//! up to the 78th column and continue under the box's first column.

/// `Format`'s default right margin.
pub const MARGIN: usize = 78;

/// A duration as the original's `show` prints it: seconds below two minutes, else minutes.
pub fn rough_duration(secs: f64) -> String {
    if secs < 120.0 {
        format!("{secs:.0}s")
    } else {
        format!("{:.0}m", secs / 60.0)
    }
}

/// A small pretty-printer.
#[derive(Debug, Default)]
pub struct Wrapped {
    out: String,
    col: usize,
    boxes: Vec<usize>,
    space: bool,
}

impl Wrapped {
    pub fn new() -> Wrapped {
        Wrapped::default()
    }

    /// Text that is never split.
    pub fn push(&mut self, s: &str) {
        if std::mem::take(&mut self.space) {
            match self.boxes.last() {
                Some(&indent) if self.col + 1 + s.chars().count() > MARGIN => {
                    self.newline(indent);
                }
                _ => {
                    self.out.push(' ');
                    self.col += 1;
                }
            }
        }
        self.out.push_str(s);
        self.col += s.chars().count();
    }

    /// A break: a space, or a new line if the next text does not fit.
    pub fn space(&mut self) {
        self.space = true;
    }

    /// A forced new line, indented.
    pub fn newline(&mut self, indent: usize) {
        self.space = false;
        self.out.push('\n');
        self.out.extend(std::iter::repeat_n(' ', indent));
        self.col = indent;
    }

    /// Opens a box at the current column.
    pub fn open(&mut self) {
        self.boxes.push(self.col);
    }

    pub fn close(&mut self) {
        self.boxes.pop();
    }

    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_as_the_original() {
        assert_eq!(rough_duration(0.0), "0s");
        assert_eq!(rough_duration(12.4), "12s");
        assert_eq!(rough_duration(119.0), "119s");
        assert_eq!(rough_duration(1200.0), "20m");
        assert_eq!(rough_duration(240.0), "4m");
        assert_eq!(rough_duration(-5.2), "-5s");
        // printf's "%.0f" rounds a tie to even, and so does Rust.
        assert_eq!(format!("{:.0}", 2.5), "2");
        assert_eq!(format!("{:.0}", 3.5), "4");
    }

    #[test]
    fn fills_lines_then_continues_under_the_box() {
        let mut w = Wrapped::new();
        w.push("  worker-1 (12): [");
        w.open();
        for (i, item) in ["a", "b"].iter().cycle().take(40).enumerate() {
            if i > 0 {
                w.space();
            }
            w.push(&format!("u1:job{item}@10s(2)"));
        }
        w.close();
        w.push("]");
        let s = w.finish();
        for line in s.lines() {
            assert!(line.len() <= MARGIN, "{line:?}");
        }
        assert!(s.lines().nth(1).unwrap().starts_with(&" ".repeat(18)));
    }
}
