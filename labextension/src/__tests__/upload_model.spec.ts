import { fileFormatOf, parseReply, requestProblem } from '../upload/model';

describe('parseReply', () => {
  it('reads the relay replies of the protocol', () => {
    expect(parseReply({ action: 'ready' })).toEqual({ action: 'ready' });
    expect(
      parseReply({ action: 'progress', seq: 1, received: 2097152 })
    ).toEqual({
      action: 'progress',
      seq: 1,
      received: 2097152
    });
    expect(
      parseReply({
        action: 'done',
        dataset: 'visits',
        rows: 3,
        columns: ['a'],
        policy_id: 'p'
      })
    ).toEqual({
      action: 'done',
      dataset: 'visits',
      rows: 3,
      columns: ['a'],
      policy_id: 'p'
    });
  });

  it('keeps only the first line of an error', () => {
    expect(
      parseReply({ action: 'error', message: 'bad policy TOML\nTraceback' })
    ).toEqual({
      action: 'error',
      message: 'bad policy TOML'
    });
  });

  it('turns anything off-protocol into an error', () => {
    expect(parseReply(null).action).toBe('error');
    expect(parseReply({ action: 'progress', seq: '1' }).action).toBe('error');
    expect(parseReply({ action: 'surprise' })).toEqual({
      action: 'error',
      message: 'the kernel sent an unexpected upload message (surprise)'
    });
  });
});

describe('upload requests', () => {
  const file = (name: string): File => new File(['a,b\n1,2\n'], name);

  it('maps file endings to the formats the relay parses', () => {
    expect(fileFormatOf('x.CSV')).toBe('csv');
    expect(fileFormatOf('x.parquet')).toBe('parquet');
    expect(fileFormatOf('x.feather')).toBe('arrow');
    expect(fileFormatOf('x.arrow')).toBe('arrow');
    expect(fileFormatOf('x.xlsx')).toBeNull();
    expect(fileFormatOf('noext')).toBeNull();
  });

  it('says what is missing or wrong', () => {
    expect(
      requestProblem({ name: 'visits', policy: 'x', file: file('v.csv') })
    ).toBeNull();
    expect(
      requestProblem({ name: 'no spaces', policy: 'x', file: file('v.csv') })
    ).toContain('dataset name');
    expect(
      requestProblem({ name: 'visits', policy: '', file: file('v.csv') })
    ).toContain('policy');
    expect(requestProblem({ name: 'visits', policy: 'x' })).toContain('file');
    expect(
      requestProblem({ name: 'visits', policy: 'x', file: file('v.xlsx') })
    ).toContain('.csv');
  });
});
