//! Recursive-descent parser producing the expression AST, with GitHub operator precedence,
//! function arity checks and a nesting-depth limit.

use super::functions::Func;
use super::lexer::{Tok, Token, lex};

/// Maximum nesting depth of an expression (parentheses, operators, calls, indexes).
pub(crate) const MAX_DEPTH: usize = 100;

/// A literal; numbers stay f64 so NaN and Infinity can be represented.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Literal {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
}

/// Binary comparison operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BinOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// One step of a property path.
#[derive(Debug, Clone)]
pub(crate) enum Accessor {
    /// `.name`
    Property(String),
    /// `[expr]`
    Index(Node),
    /// `.*` or `[*]`
    Star,
}

/// The kinds of AST node.
#[derive(Debug, Clone)]
pub(crate) enum NodeKind {
    Literal(Literal),
    /// A root named value (context), as written.
    NamedValue(String),
    Call {
        func: Func,
        args: Vec<Node>,
    },
    Not(Box<Node>),
    Binary {
        op: BinOp,
        left: Box<Node>,
        right: Box<Node>,
    },
    /// `a && b && …` (at least two operands).
    And(Vec<Node>),
    /// `a || b || …` (at least two operands).
    Or(Vec<Node>),
    /// A base followed by property/index/filter accessors.
    Access {
        base: Box<Node>,
        path: Vec<(Accessor, usize)>,
    },
}

/// An AST node with the 1-based column it starts at.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub(crate) kind: NodeKind,
    pub(crate) col: usize,
}

impl Node {
    /// Whether this node or a descendant calls a status function.
    pub(crate) fn calls_status_function(&self) -> bool {
        match &self.kind {
            NodeKind::Literal(_) | NodeKind::NamedValue(_) => false,
            NodeKind::Call { func, args } => {
                func.is_status() || args.iter().any(Node::calls_status_function)
            }
            NodeKind::Not(inner) => inner.calls_status_function(),
            NodeKind::Binary { left, right, .. } => {
                left.calls_status_function() || right.calls_status_function()
            }
            NodeKind::And(items) | NodeKind::Or(items) => {
                items.iter().any(Node::calls_status_function)
            }
            NodeKind::Access { base, path } => {
                base.calls_status_function()
                    || path.iter().any(|(a, _)| match a {
                        Accessor::Index(n) => n.calls_status_function(),
                        _ => false,
                    })
            }
        }
    }
}

impl Node {
    /// Collects the contexts and functions this node and its descendants use.
    pub(crate) fn references(&self, out: &mut Vec<super::Reference>) {
        match &self.kind {
            NodeKind::Literal(_) => {}
            NodeKind::NamedValue(name) => {
                out.push(super::Reference::Context(name.clone(), self.col))
            }
            NodeKind::Call { func, args } => {
                out.push(super::Reference::Function(func.name(), self.col));
                args.iter().for_each(|a| a.references(out));
            }
            NodeKind::Not(inner) => inner.references(out),
            NodeKind::Binary { left, right, .. } => {
                left.references(out);
                right.references(out);
            }
            NodeKind::And(items) | NodeKind::Or(items) => {
                items.iter().for_each(|a| a.references(out))
            }
            NodeKind::Access { base, path } => {
                base.references(out);
                for (a, _) in path {
                    if let Accessor::Index(n) = a {
                        n.references(out);
                    }
                }
            }
        }
    }
}

/// A parse failure: message and 1-based column.
#[derive(Debug)]
pub(crate) struct ParseError {
    pub(crate) message: String,
    pub(crate) col: usize,
}

/// Parses a whole expression.
pub(crate) fn parse_node(src: &str) -> Result<Node, ParseError> {
    let tokens = lex(src).map_err(|e| ParseError { message: e.message, col: e.col })?;
    let end_col = src.chars().count() + 1;
    if tokens.is_empty() {
        return Err(ParseError { message: "empty expression".into(), col: 1 });
    }
    let mut p = Parser { tokens, pos: 0, end_col };
    let node = p.parse_or(1)?;
    if let Some(t) = p.peek() {
        return Err(p.unexpected(t));
    }
    Ok(node)
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
    end_col: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn peek_tok(&self) -> Option<&Tok> {
        self.peek().map(|t| &t.tok)
    }

    fn next(&mut self) -> Option<Token> {
        let t = self.tokens.get(self.pos).cloned();
        if t.is_some() {
            self.pos += 1;
        }
        t
    }

    fn unexpected(&self, t: &Token) -> ParseError {
        ParseError { message: format!("unexpected token '{}'", t.tok.describe()), col: t.col }
    }

    fn unexpected_end(&self) -> ParseError {
        ParseError { message: "unexpected end of expression".into(), col: self.end_col }
    }

    fn check_depth(&self, depth: usize, col: usize) -> Result<(), ParseError> {
        if depth > MAX_DEPTH {
            Err(ParseError {
                message: format!("expression nesting exceeds the maximum depth of {MAX_DEPTH}"),
                col,
            })
        } else {
            Ok(())
        }
    }

    fn expect(&mut self, want: &Tok) -> Result<Token, ParseError> {
        match self.next() {
            Some(t) if &t.tok == want => Ok(t),
            Some(t) => Err(self.unexpected(&t)),
            None => Err(self.unexpected_end()),
        }
    }

    fn parse_or(&mut self, depth: usize) -> Result<Node, ParseError> {
        let first = self.parse_and(depth)?;
        if self.peek_tok() != Some(&Tok::Or) {
            return Ok(first);
        }
        let col = first.col;
        let mut items = vec![first];
        while self.peek_tok() == Some(&Tok::Or) {
            self.pos += 1;
            items.push(self.parse_and(depth + 1)?);
        }
        Ok(Node { kind: NodeKind::Or(items), col })
    }

    fn parse_and(&mut self, depth: usize) -> Result<Node, ParseError> {
        let first = self.parse_equality(depth)?;
        if self.peek_tok() != Some(&Tok::And) {
            return Ok(first);
        }
        let col = first.col;
        let mut items = vec![first];
        while self.peek_tok() == Some(&Tok::And) {
            self.pos += 1;
            items.push(self.parse_equality(depth + 1)?);
        }
        Ok(Node { kind: NodeKind::And(items), col })
    }

    /// Left-associative binary level; every operator adds one to the nesting depth.
    fn parse_binary(
        &mut self,
        depth: usize,
        ops: &[(Tok, BinOp)],
        operand: fn(&mut Self, usize) -> Result<Node, ParseError>,
    ) -> Result<Node, ParseError> {
        self.check_depth(depth, self.peek().map_or(self.end_col, |t| t.col))?;
        let mut left = operand(self, depth)?;
        let mut level = depth;
        while let Some(tok) = self.peek()
            && let Some(op) = ops.iter().find(|(t, _)| *t == tok.tok).map(|(_, op)| *op)
        {
            let op_col = tok.col;
            self.pos += 1;
            level += 1;
            self.check_depth(level, op_col)?;
            let right = operand(self, depth + 1)?;
            let col = left.col;
            left = Node {
                kind: NodeKind::Binary { op, left: Box::new(left), right: Box::new(right) },
                col,
            };
        }
        Ok(left)
    }

    fn parse_equality(&mut self, depth: usize) -> Result<Node, ParseError> {
        self.parse_binary(
            depth,
            &[(Tok::Eq, BinOp::Eq), (Tok::Ne, BinOp::Ne)],
            Self::parse_comparison,
        )
    }

    fn parse_comparison(&mut self, depth: usize) -> Result<Node, ParseError> {
        self.parse_binary(
            depth,
            &[
                (Tok::Lt, BinOp::Lt),
                (Tok::Le, BinOp::Le),
                (Tok::Gt, BinOp::Gt),
                (Tok::Ge, BinOp::Ge),
            ],
            Self::parse_unary,
        )
    }

    fn parse_unary(&mut self, depth: usize) -> Result<Node, ParseError> {
        if let Some(t) = self.peek()
            && t.tok == Tok::Not
        {
            let col = t.col;
            self.check_depth(depth + 1, col)?;
            self.pos += 1;
            let inner = self.parse_unary(depth + 1)?;
            return Ok(Node { kind: NodeKind::Not(Box::new(inner)), col });
        }
        self.parse_postfix(depth)
    }

    fn parse_postfix(&mut self, depth: usize) -> Result<Node, ParseError> {
        let base = self.parse_primary(depth)?;
        let mut path = Vec::new();
        loop {
            match self.peek_tok() {
                Some(Tok::Dot) => {
                    self.pos += 1;
                    match self.next() {
                        Some(Token { tok: Tok::Ident(name), col }) => {
                            path.push((Accessor::Property(name), col));
                        }
                        Some(Token { tok: Tok::Star, col }) => path.push((Accessor::Star, col)),
                        Some(t) => return Err(self.unexpected(&t)),
                        None => return Err(self.unexpected_end()),
                    }
                }
                Some(Tok::LBracket) => {
                    let open = self.next().map_or(self.end_col, |t| t.col);
                    self.check_depth(depth + 1, open)?;
                    if self.peek_tok() == Some(&Tok::Star) {
                        self.pos += 1;
                        self.expect(&Tok::RBracket)?;
                        path.push((Accessor::Star, open));
                    } else {
                        let index = self.parse_or(depth + 1)?;
                        self.expect(&Tok::RBracket)?;
                        path.push((Accessor::Index(index), open));
                    }
                }
                _ => break,
            }
        }
        if path.is_empty() {
            Ok(base)
        } else {
            let col = base.col;
            Ok(Node { kind: NodeKind::Access { base: Box::new(base), path }, col })
        }
    }

    fn parse_primary(&mut self, depth: usize) -> Result<Node, ParseError> {
        let Some(t) = self.next() else { return Err(self.unexpected_end()) };
        let col = t.col;
        let lit = |l: Literal| Ok(Node { kind: NodeKind::Literal(l), col });
        match t.tok {
            Tok::Null => lit(Literal::Null),
            Tok::True => lit(Literal::Bool(true)),
            Tok::False => lit(Literal::Bool(false)),
            Tok::Number(n) => lit(Literal::Num(n)),
            Tok::Str(s) => lit(Literal::Str(s)),
            Tok::LParen => {
                self.check_depth(depth + 1, col)?;
                let inner = self.parse_or(depth + 1)?;
                self.expect(&Tok::RParen)?;
                Ok(inner)
            }
            Tok::Ident(name) if self.peek_tok() == Some(&Tok::LParen) => {
                self.pos += 1;
                self.check_depth(depth + 1, col)?;
                let func = Func::lookup(&name).ok_or_else(|| ParseError {
                    message: format!("unrecognized function: '{name}'"),
                    col,
                })?;
                let mut args = Vec::new();
                if self.peek_tok() == Some(&Tok::RParen) {
                    self.pos += 1;
                } else {
                    loop {
                        args.push(self.parse_or(depth + 1)?);
                        match self.next() {
                            Some(Token { tok: Tok::Comma, .. }) => {}
                            Some(Token { tok: Tok::RParen, .. }) => break,
                            Some(t) => return Err(self.unexpected(&t)),
                            None => return Err(self.unexpected_end()),
                        }
                    }
                }
                func.check_arity(args.len()).map_err(|message| ParseError { message, col })?;
                Ok(Node { kind: NodeKind::Call { func, args }, col })
            }
            Tok::Ident(name) => Ok(Node { kind: NodeKind::NamedValue(name), col }),
            _ => Err(self.unexpected(&t)),
        }
    }
}
